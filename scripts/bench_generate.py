#!/usr/bin/env python3
"""Generation benchmark: TTFT, decode tokens/s and peak RSS, original vs. candidate.

Run it with ``--help``; the benchmark lives in ``pipeline.bench.generate``.
"""

import sys

from pipeline.bench.generate import main

if __name__ == "__main__":
    sys.exit(main())
