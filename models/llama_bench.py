"""What the Llama decoder fusions do to a real export: graph, parity, decode speed.

``scripts/bench_llm_fusions.py`` calls ``main``. For an original export and its optimized
model it reports: node counts and op histograms; the max |logit difference| (and presents)
on a batch-1 prefill / cached decode, a left-padded batch of 2 (prefill / decode) and a
batch of 2 with a past and 2 new tokens (``models.llama.decoder_cases``), at ORT_ENABLE_ALL
as a user runs it; greedy-decode tokens/s at each thread count, original and optimized
timed in interleaved rounds (``pipeline.runtime.timing.interleaved_rounds``: forward on even
rounds, reversed on odd), medians with the interquartile half-spread as the noise; the
resident memory after creating each session; and the CPU flags that decide MLAS kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from models.llama import decoder_cases, max_diffs
from pipeline.runtime.sessions import open_session
from pipeline.runtime.timing import interleaved_rounds


def histogram(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def cpu_flags() -> dict[str, bool]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
    return {f: f in flags for f in wanted}


def session(path: Path, threads: int, level: str = "all"):
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return open_session(str(path), options)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def greedy(sess, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], float]:
    """Greedy decode of ``new_tokens`` after ``prompt`` (batch 1); (ids, decode tokens/s)."""
    names = [o.name for o in sess.get_outputs()]
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    kv_heads, head_size = pasts[0].shape[1], pasts[0].shape[3]
    mask = np.ones((1, prompt.shape[1]), np.int64)
    feeds = {
        "input_ids": prompt,
        "attention_mask": mask,
        "position_ids": np.arange(prompt.shape[1], dtype=np.int64)[None],
    }
    for p in pasts:
        feeds[p.name] = np.zeros((1, kv_heads, 0, head_size), np.float32)
    out = dict(zip(names, sess.run(None, feeds), strict=True))
    ids = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(out["logits"][0, -1].argmax())
        ids.append(token)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        feeds = {
            "input_ids": np.array([[token]], np.int64),
            "attention_mask": mask,
            "position_ids": np.array([[mask.shape[1] - 1]], np.int64),
        }
        for p in pasts:
            feeds[p.name] = out[p.name.replace("past_key_values", "present")]
        out = dict(zip(names, sess.run(None, feeds), strict=True))
    return ids, new_tokens / (time.perf_counter() - start)


def decode_speed(original: Path, optimized: Path, threads: int, rounds: int, args) -> dict:
    prompt = np.random.default_rng(0).integers(3, 1000, (1, args.prompt_len)).astype(np.int64)
    sessions = [session(original, threads), session(optimized, threads)]
    ids = [greedy(s, prompt, args.new_tokens)[0] for s in sessions]  # warm-up; same tokens

    def sampler(sess):
        return lambda runs: greedy(sess, prompt, args.new_tokens)[1]

    samples = interleaved_rounds([sampler(s) for s in sessions], rounds, 1)
    medians = [float(np.median(s)) for s in samples]
    spread = [float(np.subtract(*np.percentile(s, [75, 25])) / 2) for s in samples]
    per_round = np.asarray(samples[1]) / np.asarray(samples[0])
    return {
        "threads": threads,
        "tokens_per_s": {"original": medians[0], "optimized": medians[1]},
        "half_iqr": {"original": spread[0], "optimized": spread[1]},
        "speedup_median_of_rounds": float(np.median(per_round)),
        "speedup_range": [float(per_round.min()), float(per_round.max())],
        "rounds": rounds,
        "same_greedy_ids": ids[0] == ids[1],
    }


def memory(path: Path, threads: int) -> dict:
    """Resident MB added by creating a session (in this process; the larger of the two runs
    is read from a fresh baseline each time, so the order matters little)."""
    before = _rss_mb()
    sess = session(path, threads)
    after = _rss_mb()
    del sess
    return {"session_rss_added_mb": round(after - before, 1)}


def _io(sess) -> list:
    return [(i.name, i.type, i.shape) for i in sess.get_inputs()] + [
        (o.name, o.type, o.shape) for o in sess.get_outputs()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("optimized", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    result: dict = {"cpu_flags": cpu_flags()}
    for tag, path in (("original", args.original), ("optimized", args.optimized)):
        hist = histogram(path)
        result[tag] = {"nodes": sum(hist.values()), "ops": hist}
    reference = session(args.original, 2)
    candidate = session(args.optimized, 2)
    result["io_identical"] = _io(reference) == _io(candidate)
    result["max_abs_diff"] = max_diffs(reference, candidate, decoder_cases(reference))
    del reference, candidate
    result["memory"] = {
        tag: memory(path, 2)
        for tag, path in (("original", args.original), ("optimized", args.optimized))
    }
    result["decode"] = [
        decode_speed(args.original, args.optimized, t, args.rounds, args) for t in args.threads
    ]
    result["peak_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
