"""LM quality benchmark: perplexity of a decoder export on held-out text, and top-1 agreement
of a candidate (an optimized or quantized copy) with it.

    python scripts/bench_lm.py REFERENCE.onnx [CANDIDATE.onnx] [--text FILE] [--windows 8]

The text is tokenized with the tokenizer next to the reference model (``NAME.tokenizer.json``
from the zoo's export, or optimum's ``tokenizer.json``); without ``--text`` it is the bundled
evaluation split (``pipeline.lm_quality.bundled_text``), which calibration never sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pipeline import lm_quality
from pipeline.quantization.lm_guard import tokenizer_beside
from pipeline.runtime import machine
from pipeline.runtime.errors import UserError
from pipeline.runtime.sessions import create_session


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="the decoder export (fp32)")
    parser.add_argument("candidate", type=Path, nargs="?", help="a model to compare with it")
    parser.add_argument("--text", type=Path, help="UTF-8 text (default: bundled evaluation)")
    parser.add_argument("--windows", type=int, default=8, help="windows scored")
    parser.add_argument("--length", type=int, default=256, help="tokens per window")
    args = parser.parse_args(argv)
    try:
        for path in filter(None, (args.reference, args.candidate)):
            if not path.is_file():
                raise UserError(f"model not found: {path}")
        text = (
            args.text.read_text(encoding="utf-8")
            if args.text
            else lm_quality.bundled_text("evaluation")
        )
        found = tokenizer_beside(args.reference) or args.reference.parent / "tokenizer.json"
        tokenizer = lm_quality.load_tokenizer(found)
        ids = np.asarray(tokenizer.encode(text).ids)
        windows = lm_quality.token_windows(ids, args.length, args.windows)
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cpu = machine.cpu()
    print(f"CPU: {cpu.model} ({cpu.isa}); {len(windows)} windows x {args.length} tokens")
    reference = lm_quality.score(
        create_session(ir.load(args.reference), optimization="all"), windows
    )
    print(f"reference perplexity {reference.perplexity:.3f} over {reference.tokens} tokens")
    if args.candidate is not None:
        candidate = lm_quality.score(
            create_session(ir.load(args.candidate), optimization="all"), windows
        )
        print(lm_quality.compare(reference, candidate).describe())
    return 0
