"""Pruning benchmark: accuracy and latency of ``--prune ffn=F`` on MiniLM and SmolLM2, with and
without the refit, alone and combined with int8 / int4.

    python scripts/bench_prune.py [--only minilm,smollm2] [--minilm FP32.onnx]
        [--smollm2 OPTIMIZED.onnx] [--rounds 31] [--json FILE]

1. all-MiniLM-L6-v2 (real weights): every row runs the whole pipeline in-process as a user
   would (``optimize.py FP32 --prune ... --metric pooled-cosine``), calibrated on
   data/sentences.txt lines 257-338 and held out on lines 1-256 (``--evaluation``). Accuracy:
   mean pooled cosine and nearest-neighbour agreement of the 256 held-out sentences (batch
   32) against the fp32 export. Latency at batch 1, sequence 128 (real text, full mask), by
   the one A/B timer (``runtime.timing``): CPU time at 1 thread (``time.thread_time``: what
   the model computes, which a shared machine disturbs little) against the fp32 export and
   against the fused unpruned model, and wall time at 2 threads against the fused model.
2. SmolLM2-135M (real weights), given already optimized (``optimize.py`` once, so its
   8-minute pass pipeline is not paid per row): each row calls the prune stage
   (``pruning.stage.run_stage``) on it, with the tokenizer beside it; perplexity and top-1
   agreement on the bundled held-out text against the unpruned model (the stage's final
   check; re-scored the same way for int4 rows); CPU time at 1 thread of a 128-token prefill
   and of one decode step after 32 tokens (``time.thread_time``, as for MiniLM), and wall
   time of greedy generation with the KV cache (``bench.generate.compare_case``: 32-token
   prompt, 32 new tokens, batch 1, 2 threads), each against the unpruned model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pipeline import lm_quality
from pipeline.bench import quant as q
from pipeline.bench.generate import compare_case
from pipeline.pruning import spec as spec_mod
from pipeline.pruning import stage as prune_stage
from pipeline.quantization import stage as quantize_stage
from pipeline.quantization.lm_guard import LmBudget, LmEvaluator, tokenizer_beside
from pipeline.runtime import inputs as inputs_mod
from pipeline.runtime import machine, sessions
from pipeline.runtime.atomic_write import write_text_atomic

CALIBRATION = slice(256, 338)  # data/sentences.txt lines 257-338
MINILM_ROWS = (  # (label, --prune, refit, --precision); the first row is the baseline
    ("fp32, fused (no pruning)", None, True, "fp32"),
    *((f"ffn={f}", f"ffn={f}", True, "fp32") for f in (0.1, 0.2, 0.3, 0.4)),
    *((f"ffn={f}, no refit", f"ffn={f}", False, "fp32") for f in (0.2, 0.4)),
    ("auto (budget 0.03)", "auto", True, "fp32"),
    ("heads=0.25", "heads=0.25", True, "fp32"),
    *((f"layers={n}", f"layers={n}", True, "fp32") for n in (1, 2)),
    ("ffn=0.2,heads=0.25", "ffn=0.2,heads=0.25", True, "fp32"),
    ("int8-dynamic alone", None, True, "int8-dynamic"),
    ("ffn=0.2 + int8-dynamic", "ffn=0.2", True, "int8-dynamic"),
)
SMOLLM2_ROWS = (
    *(
        (f"ffn={f} ({'' if refit else 'no '}refit)", f"ffn={f}", refit, "fp32")
        for f in (0.1, 0.2, 0.3)
        for refit in (True, False)
    ),
    ("int4 alone", None, True, "int4"),
    ("ffn=0.2 + int4", "ffn=0.2", True, "int4"),
)
LM_BUDGET = 5.0  # the rows report what pruning costs; no budget is meant to stop them
LOOSE_BUDGET = 0.5
MINILM_UNITS = {"ffn": 9216, "heads": 72, "layers": 6}  # 6 layers: 1536 FFN channels, 12 heads


def _minilm_build(fp32: Path, target: Path, data: dict[str, Path], row) -> dict:
    """``optimize.py`` in-process for one row; returns the report as a dict."""
    from pipeline.recipe import load_recipe
    from pipeline.run import RunOptions, run

    _, prune, refit, precision = row
    accuracy = quantize_stage.QuantizeOptions(
        precision=precision,
        calibration=data["calibration"],
        evaluation=data["evaluation"],
        tokenizer=data["tokenizer"],
        metric="pooled-cosine",
        min_neighbour_agreement=0.0,
        max_drop=0.01 if precision != "fp32" else None,
    )
    options = None
    if prune is not None:  # a fixed share reports what it costs; auto is held to the default
        budget = prune_stage.DEFAULT_MAX_DROP if prune == "auto" else LOOSE_BUDGET
        options = prune_stage.PruneOptions(spec_mod.parse(prune), budget, reconstruct=refit)
    recipe = load_recipe("default").with_overrides(speed_check=False)
    report = run(RunOptions(fp32, target, recipe, quantize=accuracy, prune=options), [])
    return report.to_dict()


def bench_minilm(args, work: Path) -> tuple[list[str], list[dict]]:
    from models.minilm import model_dir

    fp32 = args.minilm or q.minilm_fp32()
    sentences = q.load_sentences()
    held_out = sentences[: q.EVAL_SIZE]
    data = {"tokenizer": model_dir() / "tokenizer.json"}
    for role, lines in (("calibration", sentences[CALIBRATION]), ("evaluation", held_out)):
        data[role] = work / role
        data[role].mkdir()
        (data[role] / "sentences.txt").write_text("\n".join(lines) + "\n")
    batches = q.tokenize_batches(held_out, 32)
    reference = q.embed(fp32, batches, 2)
    feed = q.long_feed(held_out)
    lines = [
        "| configuration | FFN channels / heads / layers kept | pooled cosine | NN agree | "
        "CPU time vs export (1 thread) | CPU time vs fused | wall vs fused (2 threads) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows, fused = [], work / "minilm-0.onnx"
    for index, row in enumerate(MINILM_ROWS):
        if index and not q.selected(args, row[0]):
            continue  # the first row, the fused unpruned model, is every row's baseline
        target = work / f"minilm-{index}.onnx"
        started = time.perf_counter()
        report = _minilm_build(fp32, target, data, row)
        built = time.perf_counter() - started
        embeddings = q.embed(target, batches, 2)
        pruning = report.get("pruning") or {}
        totals = pruning.get("totals", {})
        kept = [totals[t]["after"] if t in totals else full for t, full in MINILM_UNITS.items()]
        result = {
            "label": row[0],
            "kept": " / ".join(map(str, kept)),
            "pooled_cosine": float(q.cosine_rows(reference, embeddings).mean()),
            "nn_agreement": q.nn_agreement(reference, embeddings),
            "cpu_vs_export": q.latency_ratio(fp32, target, feed, 1, args.rounds, time.thread_time),
            "cpu_vs_fused": q.latency_ratio(fused, target, feed, 1, args.rounds, time.thread_time),
            "wall_vs_fused": q.latency_ratio(fused, target, feed, 2, args.rounds),
            "seconds_to_build": built,
            "pruning": {k: v for k, v in pruning.items() if k not in ("notes",)},
        }
        rows.append(result)
        lines.append(
            f"| {row[0]} | {result['kept']} | {result['pooled_cosine']:.4f} | "
            f"{result['nn_agreement']:.3f} | {_ratio(result['cpu_vs_export'])} | "
            f"{_ratio(result['cpu_vs_fused'])} | {_ratio(result['wall_vs_fused'])} |"
        )
        print(lines[-1], flush=True)
    return lines, rows


def _lm_rows_source(path: Path):
    model = ir.load(path)
    sets = inputs_mod.generate_input_sets(model, {}, seed=0)[:1]
    reference = sessions.run_all(sessions.create_session(model, optimization="disable_all"), sets)
    return model, sets, reference


def _lm_steps(session: sessions.Session, past: int = 32) -> dict[str, dict]:
    """Feeds of a 128-token prefill and of one decode step after ``past`` tokens (batch 1;
    the past is zeros: the time does not depend on its values)."""
    prefill = lm_quality.prefill_feeds(session, np.arange(1, 129, dtype=np.int64))
    decode = lm_quality.prefill_feeds(session, np.array([7], dtype=np.int64))
    decode["attention_mask"] = np.ones((1, past + 1), dtype=np.int64)
    if "position_ids" in decode:
        decode["position_ids"] = np.array([[past]], dtype=np.int64)
    for name, value in decode.items():
        if name.startswith("past"):
            shape = list(value.shape)
            shape[2] = past
            decode[name] = np.zeros(shape, dtype=value.dtype)
    return {"prefill": prefill, "decode": decode}


def bench_smollm2(args, work: Path) -> tuple[list[str], list[dict]]:
    source = args.smollm2
    tokenizer = tokenizer_beside(source)  # main checked there is one
    model, sets, reference = _lm_rows_source(source)
    accuracy = quantize_stage.QuantizeOptions(tokenizer=tokenizer, metric="perplexity")
    evaluation = LmEvaluator(source, tokenizer, LmBudget(LM_BUDGET, 0.0), "evaluation")
    timing = argparse.Namespace(prompt=32, new_tokens=32, rounds=args.generate_rounds)
    steps = _lm_steps(sessions.create_session(model))
    lines = [
        "| configuration | FFN width | perplexity (fp32 "
        f"{evaluation.reference.perplexity:.3f}) | top-1 agree | CPU time prefill 128 | "
        "CPU time decode step | decode time ratio (wall, 2 threads) | TTFT ms | decode tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = []
    for index, (label, prune, refit, precision) in enumerate(SMOLLM2_ROWS):
        if not q.selected(args, label):
            continue
        started = time.perf_counter()
        candidate, width = model, None
        pruning: dict = {}
        if prune is not None:
            options = prune_stage.PruneOptions(
                spec_mod.parse(prune), max_drop=LM_BUDGET, reconstruct=refit, latency_rounds=3
            )
            candidate, pruning = prune_stage.run_stage(model, options, accuracy, sets, reference)
            width = pruning["totals"]["ffn"]
        if precision != "fp32":
            lowered = dataclasses.replace(accuracy, precision=precision)
            candidate, _ = quantize_stage.run_stage(candidate, lowered, sets, reference)
        path = work / f"smollm2-{index}.onnx"
        sessions.save_self_contained(candidate, path)
        built = time.perf_counter() - started
        if precision == "fp32":  # the stage's final check scored exactly this
            outputs = pruning["final_check"]["outputs"]
            fields = ("reference_perplexity", "perplexity", "top1_agreement", "tokens")
            quality = lm_quality.LmQuality(*(outputs[f] for f in fields))
        else:
            quality = evaluation.measure(path).quality
        cpu = {
            name: q.latency_ratio(source, path, feeds, 1, args.rounds, time.thread_time)
            for name, feeds in steps.items()
        }
        speed = compare_case(source, path, 2, 1, timing)
        result = {
            "label": label,
            "ffn_width": f"{width['after']} / {width['before']}" if width else "46080",
            "perplexity": quality.perplexity,
            "perplexity_ratio": quality.perplexity_ratio,
            "top1_agreement": quality.top1_agreement,
            "cpu_time": cpu,
            "decode_ratio": speed["decode_ratio"],
            "generation": speed,
            "seconds_to_build": built,
            "pruning": {k: v for k, v in pruning.items() if k != "notes"},
        }
        rows.append(result)
        ratio = speed["decode_ratio"]
        lines.append(
            f"| {label} | {result['ffn_width']} | {quality.perplexity:.3f} "
            f"({(quality.perplexity_ratio - 1) * 100:+.1f}%) | {quality.top1_agreement:.3f} | "
            f"{_ratio(cpu['prefill'])} | {_ratio(cpu['decode'])} | "
            f"{ratio['ratio']:.3f} ± {ratio['noise']:.3f} | "
            f"{speed['original']['ttft_ms']:.0f} -> {speed['candidate']['ttft_ms']:.0f} | "
            f"{speed['original']['decode_tokens_per_s']:.1f} -> "
            f"{speed['candidate']['decode_tokens_per_s']:.1f} |"
        )
        print(lines[-1], flush=True)
        sessions.delete_saved(path)
    return lines, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="minilm,smollm2", help="comma-separated parts")
    parser.add_argument("--minilm", type=Path, help="MiniLM fp32 export (default: bench's)")
    parser.add_argument("--smollm2", type=Path, help="SmolLM2 after optimize.py")
    parser.add_argument("--rounds", type=int, default=31, help="MiniLM latency rounds")
    parser.add_argument("--generate-rounds", type=int, default=5, help="SmolLM2 rounds")
    parser.add_argument("--filter", default="", help="only rows whose label has this (a|b)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    parts = {"minilm": bench_minilm, "smollm2": bench_smollm2}
    only = [p for p in args.only.split(",") if p]
    if "smollm2" in only and args.smollm2 is None:
        parser.error("--smollm2 OPTIMIZED.onnx is needed (its tokenizer.json beside it)")
    if "smollm2" in only and tokenizer_beside(args.smollm2) is None:
        parser.error(f"no NAME.tokenizer.json or tokenizer.json beside {args.smollm2}")
    cpu = machine.cpu()
    print(f"CPU: {cpu.model} ({cpu.isa}); load {os.getloadavg()[0]:.1f} at the start")
    result: dict = {"cpu": cpu.model, "isa": cpu.isa, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        for name in only:
            work = Path(tmp) / name
            work.mkdir()
            started = time.perf_counter()
            lines, rows = parts[name](args, work)
            elapsed = time.perf_counter() - started
            print("\n".join(lines) + f"\n({name}: {elapsed:.0f} s, load {os.getloadavg()[0]:.1f})")
            result["parts"][name] = {"rows": rows, "seconds": elapsed, "table": lines}
    if args.json:
        text = json.dumps(result, indent=2, default=_plain) + "\n"
        write_text_atomic(args.json, text, ".tmp-bench-prune-")
    return 0


def _ratio(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else str(value)
