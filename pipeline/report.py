"""The run report: one dataclass, written as report.json, Markdown or HTML (``--report``).

``SCHEMA_VERSION`` changes whenever a field is renamed or removed or changes meaning; new
fields may be added without a bump. Readers should check it. The schema is documented in
docs/report.md.

report.json opens with what a person looks for (``status``, then ``summary``: the words
``pipeline.summary`` makes, which the console and the other formats show too) and ends with
the details (the recipe, each pass application). Applications that changed nothing are
collapsed into ``passes_unchanged``; in the fixed-point loop most applications are those.
"""

from __future__ import annotations

import collections
import dataclasses
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime

import pipeline
from pipeline.load import file_sha256, referenced_data_files, tensor_bytes
from pipeline.pass_manager import count_nodes
from pipeline.render import html, json_text, markdown
from pipeline.runtime.atomic_write import check_writable_folder, write_text_atomic
from pipeline.runtime.compare import to_jsonable
from pipeline.runtime.errors import UserError
from pipeline.summary import summarize

# 2.0: keys reordered (status and summary first), "summary" added, "passes" holds only the
# applications that changed the model or were rolled back, the rest are "passes_unchanged".
SCHEMA_VERSION = "2.0"

# report.json's key order: what a person reads first, then the evidence, then the recipe and
# per-pass details. A field missing here is written after these, never dropped.
JSON_ORDER = (
    "status",
    "exit_code",
    "message",
    "summary",
    "warnings",
    "schema_version",
    "versions",
    "input_model",
    "output_model",
    "inputs",
    "parity",
    "latency",
    "pruning",
    "quantization",
    "provider",
    "fusions",
    "kernel_timing",
    "seconds",
    "recipe",
    "iterations",
    "rolled_back",
    "passes",
    "passes_unchanged",
)


@dataclass
class ModelFacts:
    """What a model is, without reading its weights twice."""

    path: str
    size_bytes: int
    sha256: str
    ir_version: int
    opset_imports: dict[str, int]
    nodes: int
    op_histogram: dict[str, int]
    initializers: int
    tensor_bytes: int
    inputs: list[dict]
    outputs: list[dict]


def _value_facts(value: ir.Value) -> dict:
    shape = None
    if value.shape is not None:
        shape = [d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape]
    return {"name": value.name, "type": str(value.type) if value.type else None, "shape": shape}


def model_facts(model: ir.Model, path: Path | None) -> ModelFacts:
    histogram: collections.Counter[str] = collections.Counter()
    for graph in model.graphs():
        for node in graph:
            key = (
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            )
            histogram[key] += 1
    size = path.stat().st_size if path is not None and path.exists() else 0
    if path is not None:
        for name in referenced_data_files(path):
            data_file = path.parent / name
            size += data_file.stat().st_size if data_file.is_file() else 0
    return ModelFacts(
        path=str(path) if path is not None else "",
        size_bytes=size,
        sha256=file_sha256(path) if path is not None and path.exists() else "",
        ir_version=model.ir_version,
        opset_imports=dict(sorted(model.opset_imports.items())),
        nodes=count_nodes(model),
        op_histogram=dict(sorted(histogram.items())),
        initializers=sum(len(g.initializers) for g in model.graphs()),
        tensor_bytes=tensor_bytes(model),
        inputs=[_value_facts(v) for v in model.graph.inputs],
        outputs=[_value_facts(v) for v in model.graph.outputs],
    )


def versions() -> dict[str, str]:
    return {
        "project": pipeline.__version__,
        "onnx": onnx.__version__,
        "onnx_ir": ir.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Report:
    """Everything a run did and proved; ``to_dict`` is the report.json content."""

    recipe: dict
    input_model: ModelFacts
    status: str = "running"  # ok | verification_failed | error
    exit_code: int | None = None
    message: str = ""
    output_model: ModelFacts | None = None
    inputs: dict = field(default_factory=dict)
    passes: list[dict] = field(default_factory=list)
    rolled_back: dict[str, str] = field(default_factory=dict)
    iterations: int = 0
    # pipeline.fusion_report rows: {fusion, expected, achieved, note} for the model's family.
    fusions: list[dict] = field(default_factory=list)
    # graph_passes.target.kernel_timing.KernelCheck rows (+ "patterns": how many matches each
    # decided): fused kernel vs. the ops it replaces, timed on this CPU.
    kernel_timing: list[dict] = field(default_factory=list)
    parity: dict | None = None
    latency: dict | None = None
    provider: dict | None = None  # pipeline.providers.Resolution.to_dict() + "check"
    # pipeline.quantization.stage.QuantizeResult.to_dict() + final_check; None when not quantized.
    quantization: dict | None = None
    # pipeline.pruning.stage.run_stage's section (targets, layers, search, final_check, ...).
    pruning: dict | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION
    versions: dict[str, str] = field(default_factory=versions)

    def to_dict(self) -> dict:
        """The report.json content, in ``JSON_ORDER``."""
        raw = to_jsonable(dataclasses.asdict(self))
        raw["summary"] = summarize(raw)
        raw["passes"], raw["passes_unchanged"] = _collapse(raw["passes"])
        ordered = {key: raw.pop(key) for key in JSON_ORDER}
        return ordered | raw


def _collapse(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(applications that changed the model or failed, one ``{name, runs, seconds}`` row per
    pass for those that found nothing to do)."""
    kept, idle = [], {}
    for record in records:
        if record["modified"] or record["verification"] in ("rolled_back", "failed"):
            kept.append(record)
            continue
        row = idle.setdefault(record["name"], {"name": record["name"], "runs": 0, "seconds": 0.0})
        row["runs"] += 1
        row["seconds"] += record["seconds"]
    return kept, list(idle.values())


# --report PATH: the file's suffix picks the format.
RENDERERS = {".json": json_text.render, ".md": markdown.render, ".html": html.render}


def check_report_paths(paths: list[Path], model_paths: tuple[Path, ...] = ()) -> None:
    """Fail before the run, not after it: each ``--report`` names a file of a known format
    in an existing, writable folder, none twice, and none is one of the model paths."""
    seen: set[Path] = set()
    protected = {p.resolve() for p in model_paths}
    for path in paths:
        if path.is_dir():
            raise UserError(f"--report path is a directory: {path}")
        if path.suffix.lower() not in RENDERERS:
            raise UserError(
                f"--report {path}: unknown format '{path.suffix}'; the suffix picks it: "
                + ", ".join(RENDERERS)
            )
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise UserError(f"--report folder does not exist: {folder}")
        resolved = path.resolve()
        if resolved in protected:
            raise UserError(f"--report path is a model path: {path}")
        if resolved in seen:
            raise UserError(f"--report names {path} twice")
        seen.add(resolved)
        try:
            check_writable_folder(folder)
        except OSError as exc:
            raise UserError(f"cannot write --report to {folder}: {exc.strerror or exc}") from exc


def write_reports(report: Report, paths: list[Path]) -> None:
    """Write the report in each path's format, each file atomically."""
    data = report.to_dict()
    for path in paths:
        text = RENDERERS[path.suffix.lower()](data)
        try:
            write_text_atomic(path, text, prefix=".tmp-report-")
        except OSError as exc:
            raise UserError(f"cannot write report {path}: {exc.strerror or exc}") from exc


def write_report(report: Report, path: Path) -> None:
    """Write one report (its suffix picks the format), atomically."""
    write_reports(report, [path])
