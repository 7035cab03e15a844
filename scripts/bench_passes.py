#!/usr/bin/env python3
"""Pass benchmark: our passes against onnxslim on the bench models.

Run it with ``--help``; the benchmark lives in ``pipeline.bench.passes``.
"""

import sys

from pipeline.bench.passes import main

if __name__ == "__main__":
    sys.exit(main())
