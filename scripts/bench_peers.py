#!/usr/bin/env python3
"""Compare our optimizer with its peers (onnxsim, onnxslim, onnxscript, ORT, Optimum) on the zoo.

Run it with ``--help``; the benchmark lives in ``pipeline.bench.peers``.
"""

import sys

from pipeline.bench.peers import main

if __name__ == "__main__":
    sys.exit(main())
