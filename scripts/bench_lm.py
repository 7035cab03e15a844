#!/usr/bin/env python3
"""LM quality: perplexity on held-out text and top-1 agreement of a candidate.

Run it with ``--help``; the benchmark lives in ``pipeline.bench.lm``.
"""

import sys

from pipeline.bench.lm import main

if __name__ == "__main__":
    sys.exit(main())
