#!/usr/bin/env python3
"""``python scripts/bench_llm_fusions.py ORIGINAL.onnx OPTIMIZED.onnx [--threads 1 2]``: op
histograms, logit parity on the decoder cases, session memory and interleaved greedy-decode
tokens/s of a decoder export before and after optimization (models/llama_bench.py)."""

from models.llama_bench import main

if __name__ == "__main__":
    main()
