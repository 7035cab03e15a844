"""Our graph passes vs. onnxslim on the same models, side by side, interleaved.

For each model: node count after each tool, and each tool's own optimization time measured
in-process on an already loaded model (ours: the recipe's passes, without the verification
sessions; onnxslim: ``onnxslim.slim`` on a ModelProto). Runs alternate ours/slim, and the
medians are reported with their ratio. Writes a Markdown table to stdout and, with
``--write``, into docs/benchmarks.md between markers.

    python scripts/bench_passes.py [MODEL.onnx ...] [--repeats 5] [--write]

With no model given, all-MiniLM-L6-v2 is exported (torch legacy and dynamo exporters) into
artifacts/bench/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx
import onnx_ir as ir
import onnxslim

from graph_passes.registry import create_pass
from pipeline.load import detach_initializer_inputs, load_model
from pipeline.pass_manager import count_nodes
from pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]

BEGIN, END = "<!-- bench_passes:begin -->", "<!-- bench_passes:end -->"


def run_ours(path: Path, pass_names: tuple[str, ...], max_iterations: int) -> tuple[float, int]:
    """Seconds spent inside our passes (fixed point, as the pass manager runs them)."""
    model = load_model(path)  # as optimize.py reads it (IR 3 raised, weights-as-inputs detached)
    detach_initializer_inputs(model)
    seconds = 0.0
    for _ in range(max_iterations):
        modified = False
        for name in pass_names:
            pass_ = create_pass(name)
            start = time.perf_counter()
            modified |= pass_(model).modified
            for graph in model.graphs():
                graph.sort()
            seconds += time.perf_counter() - start
        if not modified:
            break
    return seconds, count_nodes(model)


def run_slim(path: Path) -> tuple[float, int]:
    proto = onnx.load(str(path))
    start = time.perf_counter()
    slimmed = onnxslim.slim(proto)
    seconds = time.perf_counter() - start
    model = ir.from_proto(slimmed)
    return seconds, count_nodes(model)


def default_models() -> list[Path]:
    from models.minilm import export_minilm

    folder = ROOT / "artifacts" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for exporter in ("torch-legacy", "torch-dynamo"):
        path = folder / f"minilm-{exporter}.onnx"
        if not path.exists():
            export_minilm(path, exporter=exporter)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    models = args.models or default_models()
    rows = []
    for path in models:
        original = count_nodes(ir.load(path))
        ours_t, slim_t = [], []
        for _ in range(args.repeats):  # interleaved: ours, slim, ours, slim ...
            seconds, ours_nodes = run_ours(path, recipe.passes, recipe.max_iterations)
            ours_t.append(seconds)
            seconds, slim_nodes = run_slim(path)
            slim_t.append(seconds)
        ours_med, slim_med = statistics.median(ours_t), statistics.median(slim_t)
        rows.append(
            f"| {path.name} | {original} | {ours_nodes} | {slim_nodes} | "
            f"{ours_med:.3f} | {slim_med:.3f} | {ours_med / slim_med:.2f} |"
        )
    table = "\n".join(
        [
            f"Measured {datetime.date.today()} on {platform.machine()} "
            f"({os.cpu_count()} cores), onnxslim {onnxslim.__version__}, "
            f"recipe `{recipe.name}`, medians of {args.repeats} interleaved runs.",
            "Command: `python scripts/bench_passes.py "
            + "".join(f"{p} " for p in args.models)
            + f"--repeats {args.repeats} --write`",
            "",
            "| model | nodes before | nodes (ours) | nodes (onnxslim) | our passes (s) "
            "| onnxslim (s) | time ratio ours/slim |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    print(table)
    if args.write:
        doc = ROOT / "docs" / "benchmarks.md"
        text = doc.read_text() if doc.exists() else "# Benchmarks\n"
        block = f"{BEGIN}\n{table}\n{END}"
        if BEGIN in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text += f"\n## Graph passes vs. onnxslim\n\n{block}\n"
        doc.write_text(text)
    return 0
