#!/usr/bin/env python3
"""Pruning benchmark: accuracy and latency of --prune on MiniLM and SmolLM2.

Run it with ``--help``; the benchmark lives in ``pipeline.bench.prune``.
"""

import sys

from pipeline.bench.prune import main

if __name__ == "__main__":
    sys.exit(main())
