"""Generation benchmark: greedy decoding with the KV cache, original vs. candidate, interleaved.

    python scripts/bench_generate.py ORIGINAL.onnx CANDIDATE.onnx [--threads 1,2]
        [--batches 1,4] [--prompt 32] [--new-tokens 32] [--rounds 5]

What an LLM user feels, per (threads, batch): time to first token (the prefill of the
prompt), decode tokens/s (the cached one-token steps), end-to-end tokens/s, and peak RSS
(each model loaded and run once in a child process of its own, so the figure is that
model's). The two models run in interleaved rounds (``pipeline.runtime.timing``: one A/B
timer, one noise rule); the ratio of decode time per token is reported with its noise.
The generated ids of the two models are compared too: a faster model that decodes other
tokens is not the same model. Before timing, the script checks that both models have the
same inputs and outputs and prints the max |difference| of logits and presents on a batch-1
prefill and cached decode step, a left-padded batch of 2, and a batch of 2 with a past and
2 new tokens (``models.llama.decoder_cases``, over the positions the mask keeps).

The model must have the decoder-with-past interface of optimum's text-generation-with-past
exports: ``input_ids``, ``attention_mask``, ``position_ids`` (optional),
``past_key_values.N.key/value`` -> ``logits``, ``present.N.key/value``. A candidate whose
inputs or outputs differ from the original's (e.g. onnxruntime-genai's builder: no
``position_ids``) is timed and its tokens compared, but the per-case differences are not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pipeline.runtime import machine
from pipeline.runtime.atomic_write import write_text_atomic
from pipeline.runtime.errors import UserError
from pipeline.runtime.sessions import Session, create_session
from pipeline.runtime.timing import interleaved_rounds, ratio_stats


@dataclass(frozen=True)
class Generation:
    """One greedy generation."""

    ids: np.ndarray  # [batch, new_tokens]
    prefill_seconds: float  # the prompt's run: the time to the first token
    decode_seconds: float  # the cached one-token steps after it, together

    @property
    def decode_steps(self) -> int:
        return self.ids.shape[1] - 1


def _past_inputs(session: Session) -> dict[str, tuple[int, ...]]:
    """past input name -> its shape with batch 1 and past length 0 (other dims declared)."""
    found = {}
    for meta in session.inner.get_inputs():
        if meta.name.startswith("past_key_values."):
            dims = [d if isinstance(d, int) else 0 for d in meta.shape]
            dims[0] = 1
            found[meta.name] = tuple(dims)
    if not found:
        raise UserError("not a decoder with past key/values: no past_key_values.* input")
    return found


def generate(session: Session, prompt: np.ndarray, new_tokens: int) -> Generation:
    """Greedy decoding of ``new_tokens`` tokens after ``prompt`` ([batch, length] ids)."""
    batch, length = prompt.shape
    names = {meta.name for meta in session.inner.get_inputs()}
    past = {
        name: np.zeros((batch, *shape[1:]), dtype=np.float32)
        for name, shape in _past_inputs(session).items()
    }
    ids, mask = prompt, np.ones((batch, length), dtype=np.int64)
    chosen, prefill, decode = [], 0.0, 0.0
    for step in range(new_tokens):
        total = mask.shape[1]
        feeds = {"input_ids": ids, "attention_mask": mask, **past}
        if "position_ids" in names:
            start = total - ids.shape[1]
            feeds["position_ids"] = np.tile(np.arange(start, total, dtype=np.int64), (batch, 1))
        begin = time.perf_counter()
        outputs = session.run(feeds)
        took = time.perf_counter() - begin
        if step == 0:
            prefill = took
        else:
            decode += took
        ids = np.asarray(outputs["logits"])[:, -1].argmax(axis=-1).astype(np.int64)[:, None]
        chosen.append(ids[:, 0])
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        past = {name: outputs[name.replace("past_key_values", "present")] for name in past}
    return Generation(np.stack(chosen, axis=1), prefill, decode)


def prompt_ids(session: Session, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Token ids inside the vocabulary (its size read from the logits' declared shape)."""
    vocab = next(o.shape[-1] for o in session.inner.get_outputs() if o.name == "logits")
    return random_prompt(vocab if isinstance(vocab, int) else 1000, batch, length, seed)


def random_prompt(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """``[batch, length]`` token ids drawn from ``range(vocab)``, the same for a given seed."""
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)


def peak_rss_bytes(
    model: Path,
    threads: int,
    batch: int,
    prompt: int,
    new_tokens: int,
    module: str = "pipeline.bench.generate",
) -> int:
    """VmHWM of a child process (``python -m module --child model ...``) that loads the
    model and generates once."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--child", str(model)]
        + ["--threads", str(threads), "--batches", str(batch)]
        + ["--prompt", str(prompt), "--new-tokens", str(new_tokens)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise UserError(f"child run of {model.name} failed: {done.stderr.strip()[-500:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def _child(args: argparse.Namespace) -> int:
    session = create_session(
        ir.load(args.child), optimization="all", intra_op_threads=int(args.threads)
    )
    generate(session, prompt_ids(session, int(args.batches), args.prompt), args.new_tokens)
    print_peak_rss()
    return 0


def print_peak_rss() -> None:
    """A child's last line: its VmHWM as JSON (read by ``peak_rss_bytes``)."""
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"peak_rss_bytes": kib * 1024}))


def describe(row: dict, before: str, after: str, names: tuple[str, str] = ("", "")) -> str:
    """One printed line for a compared row: decode tok/s, time ratio, TTFT, peak RSS, tokens.
    ``names`` label the two sides (``("export ", "PyTorch ")``) where they are not obvious."""
    o, c, r = row[before], row[after], row["decode_ratio"]
    return (
        f"decode {names[0]}{o['decode_tokens_per_s']:.1f} -> {names[1]}"
        f"{c['decode_tokens_per_s']:.1f} tok/s (time ratio {r['ratio']:.3f} "
        f"±{r['noise']:.3f}), TTFT {o['ttft_ms']:.1f} -> {c['ttft_ms']:.1f} ms, "
        f"peak RSS {o['peak_rss_bytes'] / 2**20:.0f} -> "
        f"{c['peak_rss_bytes'] / 2**20:.0f} MiB, same tokens: {row['same_tokens']}"
    )


def compare_case(
    original: Path, candidate: Path, threads: int, batch: int, args: argparse.Namespace
) -> dict:
    """Both models, interleaved rounds of one whole generation each."""
    sessions = [
        create_session(ir.load(p), optimization="all", intra_op_threads=threads)
        for p in (original, candidate)
    ]
    prompt = prompt_ids(sessions[0], batch, args.prompt)
    for session in sessions:  # warm-up
        generate(session, prompt, 2)
    runs = interleaved_rounds(
        [lambda n, s=s: generate(s, prompt, args.new_tokens) for s in sessions], args.rounds, 1
    )
    per_token = [[g.decode_seconds / g.decode_steps for g in rounds] for rounds in runs]
    stats = ratio_stats(per_token[0], per_token[1])
    row: dict = {"threads": threads, "batch": batch, "decode_ratio": asdict(stats)}
    paths = (original, candidate)
    for label, rounds, path in zip(("original", "candidate"), runs, paths, strict=True):
        prefill = float(np.median([g.prefill_seconds for g in rounds]))
        decode = float(np.median([g.decode_seconds for g in rounds]))
        steps = rounds[0].decode_steps
        row[label] = {
            "ttft_ms": prefill * 1e3,
            "decode_tokens_per_s": batch * steps / decode,
            "end_to_end_tokens_per_s": batch * args.new_tokens / (prefill + decode),
            "peak_rss_bytes": peak_rss_bytes(path, threads, batch, args.prompt, args.new_tokens),
        }
    row["same_tokens"] = bool(np.array_equal(runs[0][0].ids, runs[1][0].ids))
    return row


def parity(original: Path, candidate: Path) -> dict:
    """Same interface, and the max |difference| per decoder case (see the module doc)."""
    from models.llama import decoder_cases, max_diffs

    sessions = [create_session(ir.load(p), optimization="all") for p in (original, candidate)]
    _past_inputs(sessions[0])  # refuses a model without the decoder-with-past interface
    interface = [
        [(m.name, m.type, m.shape) for m in (*s.inner.get_inputs(), *s.inner.get_outputs())]
        for s in sessions
    ]
    reference, candidate_session = (s.inner for s in sessions)
    if interface[0] != interface[1]:  # the cases' feeds are the original's inputs
        return {"same_interface": False, "max_abs_diff": {}}
    return {
        "same_interface": True,
        "max_abs_diff": max_diffs(reference, candidate_session, decoder_cases(reference)),
    }


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers: {text}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path, nargs="?")
    parser.add_argument("candidate", type=Path, nargs="?")
    parser.add_argument("--threads", type=_ints, default=[1, 2])
    parser.add_argument("--batches", type=_ints, default=[1, 4])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        args.threads, args.batches = args.threads[0], args.batches[0]
        return _child(args)
    if args.original is None or args.candidate is None:
        parser.error("ORIGINAL and CANDIDATE models are required")
    if args.prompt < 1 or args.new_tokens < 2 or args.rounds < 3:
        parser.error("--prompt >= 1, --new-tokens >= 2 and --rounds >= 3")
    try:
        for path in (args.original, args.candidate):
            if not path.is_file():
                raise UserError(f"model not found: {path}")
        cpu = machine.cpu()
        print(f"CPU: {cpu.model} ({cpu.isa}); prompt {args.prompt}, {args.new_tokens} new tokens")
        checked = parity(args.original, args.candidate)
        print(f"same inputs and outputs: {checked['same_interface']}")
        if not checked["same_interface"]:
            print("  (per-case logit differences need the same inputs: not compared)")
        for case, diff in checked["max_abs_diff"].items():
            logits, present = diff["logits"], diff["present"]
            print(f"  {case}: max |logit diff| {logits:.3g}, presents {present:.3g}")
        rows: list[dict] = []
        for threads in args.threads:
            for batch in args.batches:
                row = compare_case(args.original, args.candidate, threads, batch, args)
                rows.append(row)
                print(f"threads {threads} batch {batch}: " + describe(row, "original", "candidate"))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        result = {"cpu": cpu.model, "isa": cpu.isa, "parity": checked, "rows": rows}
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n", ".tmp-generate-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
