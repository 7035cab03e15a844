#!/usr/bin/env python3
"""Quantization benchmark: accuracy and latency of each precision tier.

Run it with ``--help``; the benchmark lives in ``pipeline.bench.quant``.
"""

import sys

from pipeline.bench.quant import main

if __name__ == "__main__":
    sys.exit(main())
