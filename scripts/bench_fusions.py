#!/usr/bin/env python3
"""Fusion benchmark: node counts, parity and latency of fused vs. unfused exports.

Run it with ``--help``; the benchmark lives in ``pipeline.bench.fusions``.
"""

import sys

from pipeline.bench.fusions import main

if __name__ == "__main__":
    sys.exit(main())
