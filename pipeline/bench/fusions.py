"""Fused MiniLM vs. its export and vs. ONNX Runtime's transformer optimizer, side by side.

Issue 3's latency bar: every fused model at least as fast as the original on ORT CPU, and on
all-MiniLM-L6-v2 at least as fast as ``onnxruntime.transformers.optimizer --model_type bert``
(which only fuses attention on the eager export). This script exports MiniLM four ways
(torch legacy eager and SDPA, torch dynamo, optimum), runs ``optimize.py`` on each and ORT's
optimizer on the eager one, then times them with the bench harness (pipeline/bench.py: one
worker process per model, interleaved rounds, median ratio with its noise) and checks parity
against the export on masks with left padding, right padding and holes.

    python scripts/bench_fusions.py [--rounds 20] [--threads 1,default] [--write]

Our optimizer runs twice per export: the default (kernel timing on, ``.ours``) and
``--no-time-kernels`` (every fusion that matches, ``.ours-all``); the latency rows time the
default, the parity rows cover both, and the default run's ``kernel_timing`` rows are shown.

``--write`` replaces the ``bench_fusions`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline import providers as providers_mod
from pipeline.bench.doc_sections import write_section
from pipeline.bench.harness import BenchConfig, run_bench
from pipeline.runtime.compare import Tolerance, compare_sets
from pipeline.runtime.sessions import open_session

ROOT = Path(__file__).resolve().parents[2]

EXPORTS = {  # label -> (exporter, attn_implementation)
    "legacy-eager": ("torch-legacy", "eager"),
    "legacy-sdpa": ("torch-legacy", "sdpa"),
    "dynamo": ("torch-dynamo", "sdpa"),
    "optimum": ("optimum", "sdpa"),
}
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "Gelu",
)
VOCAB = 30522


def _count_nodes(path: Path) -> tuple[int, dict[str, int]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return len(model.graph.node), {op: ops[op] for op in FUSED_OPS if op in ops}


def _masks(batch: int, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row 0 full, then right padding, left padding and holes in turn."""
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(1, batch):
        cut = int(rng.integers(seq // 4, seq - 1))
        kind = row % 3
        if kind == 1:
            mask[row, cut:] = 0
        elif kind == 2:
            mask[row, : seq - cut] = 0
        else:
            mask[row, rng.choice(seq, size=seq // 4, replace=False)] = 0
            mask[row, 0] = 1
    ids = rng.integers(1000, VOCAB, size=(batch, seq)).astype(np.int64)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


def _parity(reference: Path, candidate: Path, feeds: list[dict]) -> float:
    """Max abs difference over every output and input set (``runtime.compare``); padded
    positions are compared too: both models compute them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outputs = []
    for path in (reference, candidate):
        session = open_session(path, options)
        names = {i.name for i in session.get_inputs()}
        outs = [o.name for o in session.get_outputs()]
        runs = [session.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]
        outputs.append([dict(zip(outs, run, strict=True)) for run in runs])
    comparison = compare_sets(*outputs, Tolerance())
    return max(o.max_abs_error for o in comparison.outputs)


def _prepare(workdir: Path) -> dict[str, Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from models.minilm import export_minilm

    paths: dict[str, Path] = {}
    for label, (exporter, attention) in EXPORTS.items():
        source = workdir / f"minilm-{label}.onnx"
        if not source.exists():
            print(f"exporting {label} ...", flush=True)
            kwargs = {} if exporter == "optimum" else {"attn_implementation": attention}
            export_minilm(source, exporter, **kwargs)
        # Ours is always made afresh (the passes change); the export is cached.
        paths[label] = source
        for suffix, flags in (("ours", []), ("ours-all", ["--no-time-kernels"])):
            fused = workdir / f"minilm-{label}.{suffix}.onnx"
            print(f"optimize.py {source.name} {' '.join(flags)} ...", flush=True)
            subprocess.run(
                [sys.executable, str(ROOT / "optimize.py"), str(source), "-o", str(fused)]
                + ["--no-speed-check", "-q", "--report", str(fused.with_suffix(".json")), *flags],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            paths[f"{label}+{suffix}"] = fused
    ort_opt = workdir / "minilm-legacy-eager.ort-optimizer.onnx"
    if not ort_opt.exists():
        from onnxruntime.transformers.optimizer import optimize_model

        print("onnxruntime.transformers.optimizer on the eager export ...", flush=True)
        optimized = optimize_model(
            str(paths["legacy-eager"]), model_type="bert", num_heads=12, hidden_size=384
        )
        optimized.save_model_to_file(str(ort_opt))
    paths["legacy-eager+ort-optimizer"] = ort_opt
    return paths


def _bench(models: list[Path], inputs: Path, rounds: int, threads: int | None) -> dict:
    config = BenchConfig(
        models=models,
        rounds=rounds,
        inputs_path=inputs,
        intra_op_threads=threads,
        provider=providers_mod.ProviderRequest(),
    )
    return run_bench(config, progress=lambda text: None)["batches"][0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "bench" / "fusions")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--threads",
        default="1,default",
        help="ORT intra-op thread settings to measure, comma-separated ('default': ORT's)",
    )
    parser.add_argument("--shapes", default="1x128,8x128", help="batch x sequence cases")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = _prepare(args.workdir)

    rng = np.random.default_rng(0)
    parity_feeds = [_masks(4, 24, rng), _masks(3, 57, rng)]
    rows = []
    comparisons = [(label, [paths[label], paths[f"{label}+ours"]]) for label in EXPORTS]
    comparisons.append(
        (
            "ours vs ORT optimizer (eager)",
            [paths["legacy-eager+ort-optimizer"], paths["legacy-eager+ours"]],
        )
    )
    comparisons.append(
        (
            "kernel timing on vs off (sdpa)",
            [paths["legacy-sdpa+ours-all"], paths["legacy-sdpa+ours"]],
        )
    )
    settings = [None if t == "default" else int(t) for t in args.threads.split(",")]
    for threads, shape in itertools.product(settings, args.shapes.split(",")):
        batch, seq = (int(x) for x in shape.split("x"))
        feeds_path = args.workdir / f"feeds-{batch}x{seq}.npz"
        np.savez(feeds_path, **_masks(batch, seq, np.random.default_rng(batch * 1000 + seq)))
        for label, models in comparisons:
            print(f"bench {label} at {shape}, threads {threads or 'default'} ...", flush=True)
            measured = _bench(models, feeds_path, args.rounds, threads)
            ratio = measured["comparisons"][0]
            p50 = [entry["p50_ms"] for entry in measured["latency"].values()]
            rows.append(
                {
                    "comparison": label,
                    "shape": shape,
                    "threads": threads or "default",
                    "baseline": models[0].name,
                    "candidate": models[1].name,
                    "baseline_p50_ms": p50[0],
                    "candidate_p50_ms": p50[1],
                    "ratio": ratio["ratio"],
                    "noise": ratio["noise"],
                    "verdict": ratio["verdict"],
                }
            )
            print(f"  ratio {ratio['ratio']:.3f} ± {ratio['noise']:.3f} ({ratio['verdict']})")
    facts = []
    chosen = [f"{label}+{suffix}" for label in EXPORTS for suffix in ("ours", "ours-all")]
    for label in [*chosen, "legacy-eager+ort-optimizer"]:
        source, target = paths[label.split("+")[0]], paths[label]
        nodes_before, _ = _count_nodes(source)
        nodes_after, fused = _count_nodes(target)
        facts.append(
            {
                "model": target.name,
                "nodes": f"{nodes_before} -> {nodes_after}",
                "fused": fused,
                "max_abs_err": _parity(source, target, parity_feeds),
            }
        )
    timing = json.loads(paths["legacy-sdpa+ours"].with_suffix(".json").read_text())
    table = _markdown(rows, facts, timing["kernel_timing"], args)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "facts": facts}, indent=2) + "\n")
    if args.write:
        write_section(
            ROOT / "docs" / "benchmarks.md",
            "bench_fusions",
            table,
            "## Fused MiniLM vs. the export and vs. ORT's transformer optimizer",
        )
    return 0


def _markdown(
    rows: list[dict], facts: list[dict], timing: list[dict], args: argparse.Namespace
) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} "
        f"({os.cpu_count()} cores), ORT CPU, all graph optimizations on, "
        f"{args.rounds} interleaved rounds; ratio = candidate / baseline (median of per-round "
        "ratios, ± noise; a verdict other than `same` needs the ratio beyond the noise). "
        f"Command: `python scripts/bench_fusions.py --rounds {args.rounds} "
        f"--threads {args.threads} --write`.",
        "",
        "| comparison | threads | batch x seq | baseline (p50 ms) | candidate (p50 ms) "
        "| ratio | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['comparison']} | {r['threads']} | {r['shape']} "
            f"| {r['baseline']} ({r['baseline_p50_ms']:.1f}) "
            f"| {r['candidate']} ({r['candidate_p50_ms']:.1f}) | "
            f"{r['ratio']:.3f} ±{r['noise']:.3f} | {r['verdict']} |"
        )
    lines += [
        "",
        "Parity against the export (ORT_DISABLE_ALL, batches with a full row, right padding, "
        "left padding and holes; every position compared):",
        "",
        "| model | nodes | fused ops | max abs error |",
        "|---|---|---|---|",
    ]
    for f in facts:
        fused = ", ".join(f"{k} {v}" for k, v in f["fused"].items())
        lines.append(f"| {f['model']} | {f['nodes']} | {fused} | {f['max_abs_err']:.2e} |")
    lines += [
        "",
        "`.ours` is the default run (kernel timing on: a contrib fusion is left out where this "
        "CPU runs it slower than the ops it replaces); `.ours-all` is `--no-time-kernels` "
        "(every fusion that matches). What the default run measured on minilm-legacy-sdpa "
        "(report.json `kernel_timing`; ratio = fused / replaced ops, cut out and timed "
        "side by side):",
        "",
        "| fused op | replaces | shape | ratio | verdict | patterns |",
        "|---|---|---|---|---|---|",
    ]
    for t in timing:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(
            f"| {t['fused']} | {t['replaced']} | {t['shape']} | {ratio} | {t['verdict']} "
            f"| {t['patterns']} |"
        )
    return "\n".join(lines)
