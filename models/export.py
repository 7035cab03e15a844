"""Export a zoo model to ONNX, atomically, and prove it matches PyTorch before handing it back.

Three exporters (see ``models.minilm`` for how their graphs differ):

- ``torch-legacy``: ``torch.onnx.export(dynamo=False)`` with the entry's ``dynamic_axes``.
- ``torch-dynamo``: ``torch.onnx.export(dynamo=True)`` with ``dynamic_shapes`` built from the
  same axes (one ``torch.export.Dim`` per axis name).
- ``optimum``: Optimum's ``main_export`` from a local folder the model was saved into with
  ``save_pretrained`` (nothing is downloaded). It writes a folder; its ``model.onnx`` (and
  any external data) is re-saved under the target's name.

Every export is written into a staging folder beside the target, validated there, and only
then renamed into place: a model that does not match PyTorch is never written (Optimum only
logs a warning when its own check fails and exits 0; we raise ``ExportMismatch``).

Validation runs ONNX Runtime on CPU with all graph optimizations disabled (so ORT's fusions
cannot hide an exporter bug) over two input sets from the entry (batch 2 and 3, two sequence
lengths or image sizes, masks with right/left padding and holes) and compares every output
with ``pipeline.runtime.compare.compare_sets`` at the entry's tolerance (rtol=1e-3, atol=1e-4).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.zoo import ZOO, Feeds, ZooEntry
from pipeline.quantization.lm_guard import TOKENIZER_SUFFIX
from pipeline.runtime.compare import Comparison, Tolerance, compare_sets
from pipeline.runtime.sessions import open_session

logger = logging.getLogger(__name__)

EXPORTERS = ("torch-legacy", "torch-dynamo", "optimum")
# (batch, seq) of the validation input sets: every dynamic dim at two sizes, batch > 1.
VALIDATION_SHAPES = ((2, 8), (3, 13))
# Above this the weights go to ``<name>.data`` beside the model (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1 << 30


class ExportMismatch(RuntimeError):
    """The exported ONNX model's outputs differ from PyTorch's beyond the tolerance."""

    def __init__(self, message: str, comparison: Comparison | None = None) -> None:
        super().__init__(message)
        self.comparison = comparison


@dataclass
class ExportRecord:
    """What one export did. ``validation``: passed, summary, tolerance, per-output errors."""

    name: str
    path: Path
    exporter: str
    opset: int
    tiny: bool
    seconds: float
    validation: dict = field(default_factory=dict)
    nodes: int | None = None  # top-level graph nodes of the written model


def list_models() -> list[str]:
    """The zoo's model names, in registry order."""
    return list(ZOO)


def export_model(
    name: str,
    path: Path,
    *,
    exporter: str | None = None,
    opset: int = 17,
    tiny: bool = False,
) -> ExportRecord:
    """Export zoo model ``name`` to ``path`` with ``exporter`` (default: the entry's first).

    Raises:
        KeyError: ``name`` is not in the zoo.
        ValueError: the entry does not support ``exporter``.
        ExportMismatch: the ONNX model's outputs differ from PyTorch's (nothing is written).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    entry = ZOO[name]
    exporter = exporter or entry.exporters[0]
    if exporter not in entry.exporters:
        raise ValueError(
            f"{name} does not support exporter {exporter!r} (supported: {entry.exporters})"
        )
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = entry.build(tiny)
    feed_sets = [entry.example_inputs(tiny, batch, seq) for batch, seq in VALIDATION_SHAPES]
    staging = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=path.parent))
    try:
        staged = staging / path.name
        start = time.perf_counter()
        with torch.no_grad():
            if exporter == "optimum":
                _export_optimum(entry, module, staged, opset=opset)
            else:
                _export_torch(
                    entry, module, feed_sets[0], staged, opset, exporter == "torch-dynamo"
                )
        _normalize_files(staged)
        seconds = time.perf_counter() - start
        validation = validate(entry, module, staged, feed_sets)
        nodes = _node_count(staged)
        if entry.tokenizer is not None and not tiny:
            entry.tokenizer().save(str(staging / TOKENIZER_SUFFIX))
            os.replace(staging / TOKENIZER_SUFFIX, path.with_suffix(TOKENIZER_SUFFIX))
        _move_into_place(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s (%s, tiny=%s) to %s in %.1fs", name, exporter, tiny, path, seconds)
    return ExportRecord(name, path, exporter, opset, tiny, seconds, validation, nodes)


# ---------------------------------------------------------------------------------------------
# Exporters


def _names(entry: ZooEntry, feeds: Feeds, outputs: int) -> tuple[list[str], list[str]]:
    """Input/output names; a tiny model with fewer layers uses a prefix of the entry's names."""
    inputs = list(entry.input_names[: len(feeds)])
    if inputs != list(feeds):
        raise ValueError(f"{entry.name}: example inputs {list(feeds)} do not match {inputs}")
    return inputs, list(entry.output_names[:outputs])


def _torch_outputs(module, feeds: Feeds) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()))
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().numpy() for o in out]


def _export_torch(
    entry: ZooEntry, module, feeds: Feeds, target: Path, opset: int, dynamo: bool
) -> None:
    import torch

    outputs = len(_torch_outputs(module, feeds))
    input_names, output_names = _names(entry, feeds, outputs)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    common = dict(input_names=input_names, output_names=output_names, opset_version=opset)
    if dynamo:
        dims: dict[str, object] = {}

        def dim(label: str):
            key = "".join(c if c.isalnum() else "_" for c in label)
            return dims.setdefault(key, torch.export.Dim(key))

        shapes = tuple(
            {axis: dim(label) for axis, label in entry.dynamic_axes.get(n, {}).items()} or None
            for n in input_names
        )
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=shapes, optimize=True, **common
        )
        program.save(str(target))
    else:
        axes = {n: a for n, a in entry.dynamic_axes.items() if n in input_names + output_names}
        torch.onnx.export(
            module,
            args,
            str(target),
            dynamo=False,
            dynamic_axes=axes,
            do_constant_folding=True,
            **common,
        )


def _export_optimum(entry: ZooEntry, module, target: Path, *, opset: int) -> None:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise RuntimeError(
            "the optimum exporter needs optimum.exporters.onnx (optimum >= 2 with the "
            f"optimum-onnx package), which is not installed: {exc}"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="optimum-", dir=target.parent) as folder:
        source, out = Path(folder) / "source", Path(folder) / "onnx"
        module.hf_model.save_pretrained(source)
        main_export(
            str(source),
            str(out),
            task=entry.optimum_task,
            opset=opset,
            local_files_only=True,
            no_post_process=True,
            do_validation=False,  # we validate ourselves, and fail loudly
        )
        import onnx

        model = onnx.load(str(out / "model.onnx"))  # pulls in model.onnx_data if any
        _save(model, target)


# ---------------------------------------------------------------------------------------------
# Files


def _save(model, target: Path) -> None:
    import onnx

    if not _fits(model) or model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(target), save_as_external_data=True, location=target.name + ".data")
    else:
        onnx.save(model, str(target))


def _fits(model) -> bool:
    try:
        model.ByteSize()
    except Exception:  # protobuf refuses to size a message over 2 GiB
        return False
    return True


def _normalize_files(staged: Path) -> None:
    """One model file, plus ``<name>.data`` only when large: whatever the exporter wrote."""
    others = [p for p in staged.parent.iterdir() if p != staged]
    if not others:
        return
    import onnx

    model = onnx.load(str(staged))
    for other in others:
        other.unlink() if other.is_file() else shutil.rmtree(other)
    _save(model, staged)


def _move_into_place(staged: Path, path: Path) -> None:
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, path.with_name(path.name + ".data"))
    os.replace(staged, path)


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


# ---------------------------------------------------------------------------------------------
# Validation


def run_onnx(path: Path, feed_sets: list[Feeds]) -> list[dict[str, np.ndarray]]:
    """ONNX Runtime CPU outputs (name -> array) for each feed set, optimizations disabled."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = open_session(path, options)
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    results = []
    for feeds in feed_sets:
        values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
        results.append(dict(zip(names, values, strict=True)))
    return results


def validate(entry: ZooEntry, module, path: Path, feed_sets: list[Feeds]) -> dict:
    """Compare the ONNX model at ``path`` with ``module`` on ``feed_sets``.

    Returns the validation dict (passed, summary, tolerance, per-output max_abs_error and
    cosine). Raises ExportMismatch, naming the output and its error, when they differ.
    """
    rtol, atol = entry.tolerance
    tolerance = Tolerance(rtol=rtol, atol=atol)
    candidates = run_onnx(path, feed_sets)
    references, dropped = [], []
    for feeds, candidate in zip(feed_sets, candidates, strict=True):
        outputs = _torch_outputs(module, feeds)
        _, names = _names(entry, feeds, len(outputs))
        reference = dict(zip(names, outputs, strict=True))
        extra = [n for n in candidate if n not in reference]
        if extra:
            raise ExportMismatch(f"{entry.name}: ONNX outputs {extra} have no PyTorch counterpart")
        # Optimum may drop outputs of its task (BERT's pooler_output for feature-extraction);
        # compare what the ONNX model declares, and record what it dropped.
        references.append({n: v for n, v in reference.items() if n in candidate})
        dropped = [n for n in reference if n not in candidate]
    comparison = compare_sets(references, candidates, tolerance)
    result = {
        "passed": comparison.passed,
        "summary": comparison.summary(),
        "tolerance": {"rtol": rtol, "atol": atol},
        "sets": len(feed_sets),
        "outputs": {
            o.name: {"max_abs_error": o.max_abs_error, "cosine": o.cosine, "passed": o.passed}
            for o in comparison.outputs
        },
        "not_exported": dropped,
    }
    if not comparison.passed:
        worst = comparison.worst()
        raise ExportMismatch(
            f"{entry.name}: ONNX output '{worst.name}' differs from PyTorch "
            f"(max abs error {worst.max_abs_error}, {tolerance.describe()}): "
            f"{comparison.summary()}",
            comparison,
        )
    return result
