#!/usr/bin/env python3
"""Generation benchmark, PyTorch row: SmolLM2 in transformers (fp32) vs. its ONNX export.

Run it with ``--help``; the benchmark lives in ``pipeline.bench.generate_torch``.
"""

import sys

from pipeline.bench.generate_torch import main

if __name__ == "__main__":
    sys.exit(main())
