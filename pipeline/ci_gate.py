"""The CI optimization job: export the zoo, optimize every model, gate against a baseline.

    python scripts/ci_optimize.py [--models a,b | --manifest PATH | --kinds a,b] [--tiny]
        [--recipes default] [--baseline docs/baseline.json] [--update-baseline]
        [--summary PATH.md] [--out artifacts/ci] [--inject-broken-pass NAME]
        [--executor local|ray] [--address HOST:PORT] [--retries N]

Each model is exported (``batch_export.export_all``; skipped with ``--manifest``, which names
already exported files; ``--kinds`` builds the small third-party-style models of
``models/kinds.py`` instead of the zoo), then optimized with every chosen recipe through
``pipeline.run.run``: in this process, one model after the other, or with ``--executor ray``
one Ray task per model (both steps; ``pipeline/executors.py``, docs/scale-out.md). One model
failing never stops the others: its status says why (``crashed`` when its worker died on
every attempt). Each result records where its export and its optimization ran
(``"execution": {"export": ..., "optimize": ...}``, each with the executor, node, task id and
attempts; ``export`` is null for ``--kinds`` models, built in this process).

The results are compared with a committed baseline (``docs/baseline.json``) that holds
accuracy figures and latency RATIOS only, never absolute times. A result regresses when:

- its status is no longer ``ok`` (export, verification or load failed); a failure the
  baseline recorded too is shown as a known failure, not gated (fixing it is an improvement);
- parity fails, or the worst ``max_abs_error`` exceeds ``max(baseline * 10, 1e-6)``, or the
  lowest cosine drops below ``baseline - 1e-4`` (a factor of 10 absorbs float reassociation
  noise across ONNX Runtime builds; a real numeric change moves errors by orders of magnitude);
- ``nodes_after`` is above the baseline's;
- a pass was rolled back that the baseline did not roll back;
- the latency ratio (optimized / original, measured interleaved inside ``run()``) is worse
  than ``baseline ratio + max(3 * combined noise, 0.10)``, combined noise being
  ``sqrt(noise_baseline**2 + noise_now**2)``: a speed regression must exceed measured noise.

Improvements are reported, never failures. Baseline keys are ``"<model>/<recipe>"``. A result
is compared with the entry of the same model and recipe; when the baseline has no entry for
that recipe but has one for the model (under the recipe the baseline was recorded with), it
is compared with that entry: the baseline is the bar each model must meet, so switching CI
to a weaker recipe is a regression, not a new model. A model absent from the baseline is
"new" (a warning, not a failure).

Kernel timing (graph_passes/kernel_timing.py) is off here unless ``--time-kernels``: it
leaves a fusion out where this machine measures the fused kernel slower, so node counts would
depend on the CPU and on noise near a tie, and ``nodes_after`` must be a deterministic bar.
The gate checks that every fusion still matches; the speed gate still times the result.

``--update-baseline`` replaces the baseline with this run's results (atomically), so record
it with the same model selection CI uses (``--tiny``, all zoo models). ``--inject-broken-pass
NAME`` registers, for this process only, a pass that turns every Add into Sub and runs it
first: the verifier rolls it back, and the gate must fail on that.

Exit codes: 0 no regression (or ``--update-baseline``), 1 at least one regression (one
readable line each), 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from graph_passes.base import GraphPass
from graph_passes.registry import REGISTRY
from graph_passes.testing.helpers import AddToSub
from pipeline import executors
from pipeline.recipe import Recipe, load_recipe
from pipeline.render import markdown
from pipeline.report import Report, versions, write_report
from pipeline.run import RunOptions, run
from pipeline.runtime.atomic_write import write_text_atomic
from pipeline.runtime.errors import UserError, VerificationFailed

logger = logging.getLogger("ci_optimize")
ROOT = Path(__file__).resolve().parents[1]

BASELINE_SCHEMA_VERSION = "1.0"
RESULTS_SCHEMA_VERSION = "1.1"  # 1.1: each result's "execution"
EXIT_OK, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2

# Regression thresholds (documented in the module docstring and in the summary).
ERROR_FACTOR = 10.0
ERROR_FLOOR = 1e-6
COSINE_DROP = 1e-4
LATENCY_NOISE_FACTOR = 3.0
LATENCY_MIN_MARGIN = 0.10

RULES = (
    f"status no longer ok; parity failing; max_abs_error > max(baseline * {ERROR_FACTOR:g}, "
    f"{ERROR_FLOOR:g}); min_cosine < baseline - {COSINE_DROP:g}; nodes_after > baseline; a "
    "pass rolled back that the baseline did not roll back; latency_ratio > baseline + "
    f"max({LATENCY_NOISE_FACTOR:g} * combined noise, {LATENCY_MIN_MARGIN:g})"
)

# models/kinds.py builders usable without the zoo (fast, no torch): name -> builder.
KIND_NAMES = ("float_mlp", "float_cnn", "output_32_1_8210", "paddle_ocr", "old_zoo_cnn")


class UsageError(Exception):
    """Bad command-line usage or unreadable inputs (exit 2)."""


# --------------------------------------------------------------------------------------
# the deliberately broken pass (--inject-broken-pass)


def inject_broken_pass(name: str) -> type[GraphPass]:
    """Register a parity-breaking pass under ``name`` in this process's REGISTRY."""
    if name in REGISTRY:
        raise UsageError(f"--inject-broken-pass: '{name}' is already a registered pass")
    cls = type("InjectedBrokenPass", (AddToSub,), {"name": name})
    REGISTRY[name] = cls
    return cls


# --------------------------------------------------------------------------------------
# models: export, manifest, kinds


@dataclasses.dataclass
class ModelSource:
    name: str
    path: Path | None
    status: str = "ok"  # ok | export_failed
    message: str = ""
    inputs: Path | None = None  # a folder of .npz input sets (the zoo entry's own inputs)
    size_bytes: int | None = None  # the model with its external data, when the manifest says
    execution: dict | None = None  # where the export ran (the manifest record's "execution")


def _sources_from_manifest(manifest: dict, folder: Path) -> list[ModelSource]:
    models = manifest.get("models")
    if not isinstance(models, dict):
        raise UsageError("manifest has no 'models' table")
    sources = []
    for name, entry in sorted(models.items()):
        status = entry.get("status")
        file = entry.get("file")
        path = folder / file if file else None
        placed = {"execution": entry.get("execution")}
        if status in ("ok", "skipped") and path is not None and path.is_file():
            tiny = bool((entry.get("export") or {}).get("tiny"))
            inputs = _zoo_inputs(name, tiny, folder) if entry.get("source") == "zoo" else None
            size = entry.get("size_bytes")
            size = size if isinstance(size, int) else None
            sources.append(ModelSource(name, path, inputs=inputs, size_bytes=size, **placed))
        else:
            reason = entry.get("error") or entry.get("reason") or f"export status {status}"
            sources.append(ModelSource(name, None, "export_failed", _line(reason), **placed))
    return sources


def _zoo_inputs(name: str, tiny: bool, folder: Path) -> Path | None:
    """Write the zoo entry's own input sets (the shapes its export was validated on) as .npz.

    Generic generated inputs cannot know a decoder's rule that the attention mask spans past
    plus new tokens; the entry's example inputs do, so verification uses them.
    """
    try:
        from models.export import VALIDATION_SHAPES
        from models.zoo import ZOO
    except ImportError:
        return None
    if name not in ZOO:
        return None
    target = folder / "inputs" / name
    target.mkdir(parents=True, exist_ok=True)
    for index, (batch, seq) in enumerate(VALIDATION_SHAPES):
        np.savez(target / f"set{index}.npz", **ZOO[name].example_inputs(tiny, batch, seq))
    return target


def _export_zoo(
    names: list[str] | None, out: Path, tiny: bool, executor: executors.Executor
) -> list[ModelSource]:
    try:
        from models.export import list_models
    except ImportError as exc:
        raise UsageError(
            f"the zoo exporter is not available ({exc}); use --manifest or --kinds"
        ) from exc
    from models.batch import export_all

    available = list(list_models())
    chosen = names or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)}; zoo: {', '.join(available)}")
    folder = out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    # export_all writes folder/manifest.json itself and keeps records of models not in this
    # run, so only the chosen ones are taken from it.
    manifest = export_all(
        chosen,
        folder,
        tiny=tiny,
        jobs=2,
        progress=False,
        executor=executor.kind,
        address=executor.address,
        retries=executor.retries,
    )
    models = {n: r for n, r in manifest.get("models", {}).items() if n in chosen}
    missing = {n: {"status": "failed", "error": "not in the export manifest"} for n in chosen}
    return _sources_from_manifest({"models": {**missing, **models}}, folder)


def _build_kinds(names: list[str], out: Path) -> list[ModelSource]:
    import onnx

    from models import kinds

    unknown = sorted(set(names) - set(KIND_NAMES))
    if unknown:
        raise UsageError(f"unknown kind(s) {', '.join(unknown)}; known: {', '.join(KIND_NAMES)}")
    folder = out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for name in names:
        path = folder / f"{name}.onnx"
        onnx.save(getattr(kinds, name)(), path)
        sources.append(ModelSource(name, path, size_bytes=path.stat().st_size))
    return sources


# --------------------------------------------------------------------------------------
# optimize and collect


def _num(value: object) -> float | None:
    """A float from a report number ("inf"/"nan" strings included), None when absent."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _line(text: object) -> str:
    return " ".join(str(text).split())[:300]


def summarize_report(report: Report | None) -> dict:
    """The figures the gate compares, from one run's report."""
    row: dict = {
        "nodes_before": None,
        "nodes_after": None,
        "parity_passed": None,
        "max_abs_error": None,
        "min_cosine": None,
        "rolled_back": [],
        "latency_ratio": None,
        "latency_noise": None,
        "latency_verdict": None,
    }
    if report is None:
        return row
    row["nodes_before"] = report.input_model.nodes
    if report.output_model is not None:
        row["nodes_after"] = report.output_model.nodes
    row["rolled_back"] = sorted(report.rolled_back)
    parity = report.parity
    if parity:
        row["parity_passed"] = bool(parity.get("passed"))
        errors = [_num(o.get("max_abs_error")) for o in parity.get("outputs", [])]
        cosines = [_num(o.get("cosine")) for o in parity.get("outputs", [])]
        errors = [e for e in errors if e is not None]
        cosines = [c for c in cosines if c is not None and not math.isnan(c)]
        row["max_abs_error"] = max(errors) if errors else None
        row["min_cosine"] = min(cosines) if cosines else None
    if report.latency:
        row["latency_ratio"] = _num(report.latency.get("ratio"))
        row["latency_noise"] = _num(report.latency.get("noise"))
        row["latency_verdict"] = report.latency.get("verdict")
    return row


def _row(model: str, recipe: str, status: str, message: str) -> dict:
    """A result row without figures (a model that was not, or not yet, optimized)."""
    row = {"model": model, "recipe": recipe, "status": status, "message": message}
    row.update(summarize_report(None), seconds=0.0, report=None)
    return row


def optimize_model(
    source: ModelSource, recipes: list[Recipe], out: Path, injected: str | None = None
) -> list[dict]:
    """Optimize one model with every recipe, one row each; never raises for a model's failure.

    The unit of work of the optimize step, run where the executor puts it (a plain top-level
    function: Ray pickles it by name). A worker process has not run ``main``, so it registers
    the ``--inject-broken-pass`` pass itself, for this call only (Ray reuses workers).
    """
    added = injected is not None and injected not in REGISTRY
    if added:
        inject_broken_pass(injected)
    try:
        return [optimize_one(source, recipe, out) for recipe in recipes]
    finally:
        if added:
            REGISTRY.pop(injected, None)


def optimize_one(source: ModelSource, recipe: Recipe, out: Path) -> dict:
    """Optimize one model with one recipe in this process; never raises for a model's failure."""
    row = _row(source.name, recipe.name, source.status, source.message)
    if source.path is None:
        return row
    (out / "optimized").mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(parents=True, exist_ok=True)
    stem = f"{source.name}.{recipe.name}"
    options = RunOptions(
        input_path=source.path,
        output_path=out / "optimized" / f"{stem}.onnx",
        recipe=recipe,
        inputs_path=source.inputs,
    )
    sink: list[Report] = []
    started = time.perf_counter()
    try:
        run(options, sink)
        status, message = "ok", ""
    except VerificationFailed as exc:
        status, message = "verification_failed", _line(exc)
    except UserError as exc:
        status, message = "error", _line(exc)
    except Exception as exc:  # a bug in the pipeline: record it, keep going with the others
        logger.exception("internal error on %s/%s", source.name, recipe.name)
        status, message = "internal_error", _line(f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    report = sink[0] if sink else None
    report_path = None
    if report is not None:
        if status != "ok":
            report.status = status
            report.message = message
        report_path = out / "reports" / f"{stem}.json"
        write_report(report, report_path)
    row.update(status=status, message=message, seconds=round(seconds, 3))
    row.update(summarize_report(report))
    row["report"] = str(report_path) if report_path else None
    return row


# --------------------------------------------------------------------------------------
# the gate


@dataclasses.dataclass
class BaselineComparison:
    key: str
    verdict: str  # pass | regression | new | improved | known_failure
    compared_with: str | None = None
    regressions: list[str] = dataclasses.field(default_factory=list)
    improvements: list[str] = dataclasses.field(default_factory=list)
    known_failure: bool = False


def _baseline_entry(baseline: dict, model: str, recipe: str) -> tuple[str, dict] | None:
    entries = baseline.get("models", {})
    key = f"{model}/{recipe}"
    if key in entries:
        return key, entries[key]
    for bar_recipe in baseline.get("recipes", []):
        if f"{model}/{bar_recipe}" in entries:
            return f"{model}/{bar_recipe}", entries[f"{model}/{bar_recipe}"]
    for other, entry in sorted(entries.items()):
        if other.rsplit("/", 1)[0] == model:
            return other, entry
    return None


def compare_row(row: dict, baseline: dict) -> BaselineComparison:
    """Decide one result against the baseline (rules in the module docstring)."""
    key = f"{row['model']}/{row['recipe']}"
    found = _baseline_entry(baseline, row["model"], row["recipe"])
    if found is None:
        return BaselineComparison(key, "new")
    base_key, base = found
    verdict = BaselineComparison(key, "pass", compared_with=base_key)
    bad, good = verdict.regressions, verdict.improvements
    vs = f" (baseline {base_key})" if base_key != key else ""
    if row["status"] != "ok" and base.get("status") == "ok":
        bad.append(f"status {row['status']} (baseline ok): {row['message']}")
    elif row["status"] != "ok":  # a failure the baseline recorded: known, shown, not gated
        verdict.known_failure = True
    elif base.get("status") != "ok":
        good.append(f"status {base.get('status')} -> ok")
    if row["parity_passed"] is False:
        bad.append("parity check failed")
    err, base_err = _num(row["max_abs_error"]), _num(base.get("max_abs_error"))
    if err is not None and base_err is not None:
        limit = max(base_err * ERROR_FACTOR, ERROR_FLOOR)
        if err > limit or math.isnan(err):
            bad.append(f"max_abs_error {err:.3g} > limit {limit:.3g} (baseline {base_err:.3g})")
        elif err < base_err / ERROR_FACTOR and base_err > ERROR_FLOOR:
            good.append(f"max_abs_error {base_err:.3g} -> {err:.3g}")
    cos, base_cos = _num(row["min_cosine"]), _num(base.get("min_cosine"))
    if cos is not None and base_cos is not None and cos < base_cos - COSINE_DROP:
        bad.append(f"min cosine {cos:.6f} < baseline {base_cos:.6f} - {COSINE_DROP:g}")
    nodes, base_nodes = row["nodes_after"], base.get("nodes_after")
    if nodes is not None and base_nodes is not None:
        if nodes > base_nodes:
            bad.append(f"nodes_after {nodes} > baseline {base_nodes}{vs}")
        elif nodes < base_nodes:
            good.append(f"nodes_after {base_nodes} -> {nodes}")
    new_rollbacks = sorted(set(row["rolled_back"]) - set(base.get("rolled_back", [])))
    if new_rollbacks:
        bad.append(f"pass(es) rolled back that the baseline did not roll back: {new_rollbacks}")
    fixed = sorted(set(base.get("rolled_back", [])) - set(row["rolled_back"]))
    if fixed and row["status"] == "ok":
        good.append(f"no longer rolled back: {fixed}")
    ratio, base_ratio = _num(row["latency_ratio"]), _num(base.get("latency_ratio"))
    if ratio is not None and base_ratio is not None:
        noise = math.hypot(_num(row["latency_noise"]) or 0.0, _num(base.get("latency_noise")) or 0)
        margin = max(LATENCY_NOISE_FACTOR * noise, LATENCY_MIN_MARGIN)
        if ratio > base_ratio + margin:
            bad.append(
                f"latency ratio {ratio:.3f} > baseline {base_ratio:.3f} + margin {margin:.3f} "
                f"(combined noise {noise:.3f})"
            )
        elif ratio < base_ratio - margin:
            good.append(f"latency ratio {base_ratio:.3f} -> {ratio:.3f}")
    if bad:
        verdict.verdict = "regression"
    elif verdict.known_failure:
        verdict.verdict = "known_failure"
    elif good:
        verdict.verdict = "improved"
    return verdict


def baseline_from_rows(rows: list[dict], recipes: list[str], source: str, tiny: bool) -> dict:
    fields = (
        "recipe",
        "status",
        "message",
        "nodes_before",
        "nodes_after",
        "max_abs_error",
        "min_cosine",
        "latency_ratio",
        "latency_noise",
        "rolled_back",
    )
    models = {}
    for row in rows:
        entry = {f: row[f] for f in fields}
        for f in ("max_abs_error", "min_cosine", "latency_ratio", "latency_noise"):
            if entry[f] is not None:
                entry[f] = float(f"{entry[f]:.6g}") if math.isfinite(entry[f]) else str(entry[f])
        models[f"{row['model']}/{row['recipe']}"] = entry
    return {
        "schema_version": BASELINE_SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": source,
        "tiny": tiny,
        "recipes": recipes,
        "rules": RULES,
        "versions": versions(),
        "models": dict(sorted(models.items())),
    }


def load_baseline(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"baseline not found: {path} (record one with --update-baseline)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"baseline {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise UsageError(f"baseline {path} has no 'models' table")
    major = str(data.get("schema_version", "")).split(".")[0]
    if major != BASELINE_SCHEMA_VERSION.split(".")[0]:
        raise UsageError(
            f"baseline {path}: unsupported schema_version {data.get('schema_version')}"
        )
    return data


def _write_json(path: Path, data: dict) -> None:
    """Atomic write: temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------
# summary


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render_summary(
    rows: list[dict], verdicts: list[BaselineComparison], notes: list[str], title: str
) -> str:
    lines = [f"## {title}", ""]
    lines.append(
        "| model | recipe | status | nodes before -> after | parity | latency ratio ± noise "
        "| verdict |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    marks = {
        "pass": "✅ pass",
        "improved": "⬆️ improved",
        "new": "🆕 new",
        "regression": "❌ FAIL",
        "known_failure": "⚠️ known failure",
    }
    for row, verdict in zip(rows, verdicts, strict=True):
        if row["parity_passed"] is None:
            parity = "–"
        else:
            parity = "✅" if row["parity_passed"] else "❌"
            parity += f" max {_fmt(row['max_abs_error'], '.2g')}"
            parity += f", cos {_fmt(row['min_cosine'], '.6f')}"
        latency = "–"
        if row["latency_ratio"] is not None:
            latency = f"{row['latency_ratio']:.3f} ± {_fmt(row['latency_noise'], '.3f')}"
        nodes = f"{_fmt(row['nodes_before'], 'd')} -> {_fmt(row['nodes_after'], 'd')}"
        lines.append(
            f"| {row['model']} | {row['recipe']} | {row['status']} | {nodes} | {parity} "
            f"| {latency} | {marks[verdict.verdict]} |"
        )
    regressions = [(v, r) for v in verdicts for r in v.regressions]
    lines += ["", f"### Regressions ({len(regressions)})", ""]
    lines += [f"- `{v.key}`: {r}" for v, r in regressions] or ["None."]
    improvements = [(v, r) for v in verdicts for r in v.improvements]
    if improvements:
        lines += ["", "### Improvements", ""]
        lines += [f"- `{v.key}`: {r}" for v, r in improvements]
    if notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", f"<sub>Regression rules: {RULES}.</sub>"]
    return "\n".join(lines) + "\n"


def render_details(rows: list[dict]) -> str:
    """Each result's own report, folded, in the Markdown ``--report r.md`` writes."""
    parts = []
    for row in rows:
        if not row.get("report"):
            continue
        data = json.loads(Path(row["report"]).read_text(encoding="utf-8"))
        parts += [
            f"<details><summary>{row['model']} / {row['recipe']}: {row['status']}</summary>",
            "",
            markdown.render(data, level=4),
            "</details>",
            "",
        ]
    return "\n".join(["", "### Reports", "", *parts]) if parts else ""


# --------------------------------------------------------------------------------------
# main


def gate_recipes(recipes: list[Recipe], time_kernels: bool) -> list[Recipe]:
    """The recipes as the gate runs them: kernel timing off unless asked (module docstring)."""
    return recipes if time_kernels else [r.with_overrides(time_kernels=False) for r in recipes]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from models.batch import known_models

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="zoo models: " + ", ".join(known_models()),
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--models", help="comma-separated zoo models (default: the whole zoo)")
    which.add_argument("--manifest", type=Path, help="an existing batch_export manifest.json")
    which.add_argument(
        "--kinds",
        help=f"models/kinds.py builders instead of the zoo ('all' = {', '.join(KIND_NAMES)})",
    )
    parser.add_argument("--tiny", action="store_true", help="export tiny zoo variants")
    executors.add_arguments(parser)
    parser.add_argument(
        "--recipes", default="default", help="comma-separated recipes (default: default)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=ROOT / "docs" / "baseline.json",
        help="the figures results are gated against (default: docs/baseline.json)",
    )
    parser.add_argument(
        "--update-baseline",
        action="store_true",
        help="write this run's results as the new baseline instead of gating against it",
    )
    parser.add_argument("--summary", type=Path, help="write the Markdown summary here")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "artifacts" / "ci",
        help="folder for exports, optimized models, reports, results.json and summary.md "
        "(default: artifacts/ci)",
    )
    parser.add_argument(
        "--inject-broken-pass",
        metavar="NAME",
        help="register a parity-breaking pass NAME (every Add -> Sub) and run it first",
    )
    parser.add_argument(
        "--time-kernels",
        action="store_true",
        help="keep the recipe's kernel timing (default: off, so the gate is deterministic)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return parser.parse_args(argv)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _select_sources(
    args: argparse.Namespace, out: Path, executor: executors.Executor
) -> tuple[list[ModelSource], str]:
    """The models to optimize and where they came from (manifest | kinds | zoo)."""
    if args.manifest is not None:
        try:
            manifest = json.loads(args.manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read manifest {args.manifest}: {exc}") from exc
        if not isinstance(manifest, dict):
            raise UsageError(f"manifest {args.manifest} is not a JSON object")
        return _sources_from_manifest(manifest, args.manifest.parent.resolve()), "manifest"
    if args.kinds is not None:
        names = list(KIND_NAMES) if args.kinds == "all" else _split(args.kinds)
        return _build_kinds(names, out), "kinds"
    chosen = _split(args.models) or None
    return _export_zoo(chosen, out, args.tiny, executor), "zoo"


def _optimize_all(
    sources: list[ModelSource],
    recipes: list[Recipe],
    out: Path,
    injected: str | None,
    executor: executors.Executor,
) -> list[dict]:
    """Every model with every recipe, one unit of work per model; rows in the order of
    ``sources`` and ``recipes`` whatever order they finish in, each with where it ran."""
    finished: dict[str, list[dict]] = {}

    def on_done(item: executors.Work, outcome: executors.Outcome) -> None:
        source = item.args[0]
        rows = outcome.value
        if rows is None:  # the worker died on every attempt, or could not be placed
            message = _line(outcome.error)
            rows = [_row(source.name, r.name, "crashed", message) for r in recipes]
        for row in rows:
            row["execution"] = {"export": source.execution, "optimize": outcome.placement}
            logger.info("%s/%s: %s", row["model"], row["recipe"], row["status"])
            print(f"{row['model']}/{row['recipe']}: {row['status']} {row['message']}".strip())
        finished[source.name] = rows

    work = [
        executors.Work(
            source.name,
            optimize_model,
            (source, recipes, out, injected),
            memory=executors.memory_request(source.size_bytes),
        )
        for source in sources
    ]
    executor.run(work, on_done)
    return [row for source in sources for row in finished[source.name]]


def retry_notes(rows: list[dict]) -> list[str]:
    """One note per model and step whose worker died on an attempt (rows of one model share
    their placements, so a model is named once, not once per recipe)."""
    notes = []
    for row in rows:
        for step, placement in row["execution"].items():
            note = executors.retry_note(placement)
            line = f"{row['model']}, {step}: {note}"
            if note and line not in notes:
                notes.append(line)
    return notes


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    injected = None
    try:
        try:
            recipe_names = _split(args.recipes)
            if not recipe_names:
                raise UsageError("--recipes is empty")
            if args.inject_broken_pass:
                inject_broken_pass(args.inject_broken_pass)  # raises when the name is taken
                injected = args.inject_broken_pass
            recipes = [load_recipe(name) for name in recipe_names]
            if injected:
                recipes = [dataclasses.replace(r, passes=(injected, *r.passes)) for r in recipes]
            recipes = gate_recipes(recipes, args.time_kernels)
            baseline = None if args.update_baseline else load_baseline(args.baseline)
            executor = executors.from_args(args)
            out: Path = args.out.resolve()  # the path a worker in another folder is given
            out.mkdir(parents=True, exist_ok=True)
            sources, source_kind = _select_sources(args, out, executor)
        except (UsageError, UserError) as exc:
            print(f"error: {_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        if not sources:
            print("error: no models to optimize", file=sys.stderr)
            return EXIT_USAGE
        rows = _optimize_all(sources, recipes, out, injected, executor)
    finally:
        if injected:
            REGISTRY.pop(injected, None)

    notes = []
    if injected:
        notes.append(f"injected broken pass `{injected}` (every Add -> Sub) ran first")
    notes += retry_notes(rows)
    if args.update_baseline:
        data = baseline_from_rows(rows, recipe_names, source_kind, args.tiny)
        _write_json(args.baseline, data)
        failed = [f"{r['model']}/{r['recipe']}" for r in rows if r["status"] != "ok"]
        if failed:
            notes.append(f"baseline records non-ok results: {', '.join(failed)}")
        notes.append(f"baseline written to {args.baseline} ({len(rows)} entries)")
        verdicts = [BaselineComparison(f"{r['model']}/{r['recipe']}", "new") for r in rows]
        title = "CI optimization: baseline updated"
    else:
        verdicts = [compare_row(row, baseline) for row in rows]
        ran = {v.compared_with for v in verdicts} | {v.key for v in verdicts}
        missing = sorted(set(baseline["models"]) - ran)
        if missing and source_kind != "kinds" and not args.models:
            notes.append(f"in the baseline but not run: {', '.join(missing)}")
        known = [v.key for v in verdicts if v.known_failure]
        if known:
            notes.append(f"failing in the baseline too (known, not gated): {', '.join(known)}")
        new = [v.key for v in verdicts if v.verdict == "new"]
        if new:
            notes.append(f"not in the baseline (new, not gated): {', '.join(new)}")
        title = "CI optimization"

    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "baseline": str(args.baseline),
        "results": [
            {
                **row,
                "verdict": v.verdict,
                "compared_with": v.compared_with,
                "regressions": v.regressions,
                "improvements": v.improvements,
            }
            for row, v in zip(rows, verdicts, strict=True)
        ],
    }
    _write_json(out / "results.json", results)
    summary = render_summary(rows, verdicts, notes, title) + render_details(rows)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    if args.summary is not None:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(summary, encoding="utf-8")
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as handle:
            handle.write(summary)

    for note in notes:
        print(f"note: {note}")
    if args.update_baseline:
        return EXIT_OK
    regressions = [f"REGRESSION {v.key}: {r}" for v in verdicts for r in v.regressions]
    sys.stdout.flush()
    for line in regressions:
        print(line, file=sys.stderr)
    ok = len(rows) - sum(v.verdict == "regression" for v in verdicts)
    print(f"{ok}/{len(rows)} results pass the gate; {len(regressions)} regression(s)")
    return EXIT_REGRESSION if regressions else EXIT_OK
