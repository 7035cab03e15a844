#!/usr/bin/env python3
"""Peak RSS of one optimize.py run, as a multiple of the model's size on disk.

Run it with ``--help``; the benchmark lives in ``pipeline.bench.memory``.
"""

import sys

from pipeline.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
