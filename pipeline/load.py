"""Load a model safely and save one atomically.

Loading goes through onnx-ir so external data stays memory-mapped (models over 2 GB never
become one protobuf). Every way a file can be unusable is turned into a one-line ``UserError``.
Saving writes into a temporary folder beside the target and renames into place, so the target
path holds either the previous file or the complete new one, never a partial write.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

# Above this many bytes of tensor data a model is saved with external data: a single
# protobuf cannot exceed 2 GiB, and a margin keeps graph + attributes under the limit.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load and check an ONNX model, raising ``UserError`` for anything unusable."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input model not found: {path}")
    if path.is_dir():
        raise UserError(f"input is a directory, not an .onnx file: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"input model is an empty file: {path}")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises several unrelated types for bad bytes
        raise UserError(f"not a readable ONNX model: {path} ({_first_line(exc)})") from exc
    if len(model.graph) == 0 and not model.graph.outputs:
        raise UserError(f"file parses but holds no ONNX graph (not a model?): {path}")
    if not model.graph.outputs:
        raise UserError(f"model graph has no outputs, nothing to optimize: {path}")
    _check_external_data(model, path)
    check_model(path)
    return model


def check_model(path: Path) -> None:
    """Run the ONNX checker on a file (by path, so external data and >2 GB models work)."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise UserError(f"model fails the ONNX checker: {_first_line(exc)}") from exc


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Fail early and clearly when an external-data file is missing or too short."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            data_path = Path(tensor.base_dir) / tensor.location
            if not data_path.is_file():
                raise UserError(
                    f"external data file missing for initializer '{value.name}': {data_path}"
                )
            needed = (tensor.offset or 0) + (tensor.length or 0)
            if data_path.stat().st_size < needed:
                raise UserError(
                    f"external data file too short for initializer '{value.name}': {data_path}"
                )


def tensor_bytes(model: ir.Model) -> int:
    """Total bytes of initializer data in all graphs (no tensor data is read)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def save_model(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None
) -> None:
    """Write ``model`` to ``path`` atomically, with external data when large or asked.

    The model and any external-data file are written into a temporary folder in the target's
    directory, then renamed into place, data file first, so a reader never sees a model whose
    data is missing. ``external_data=None`` decides by size.
    """
    path = Path(path)
    target_dir = path.parent if str(path.parent) else Path(".")
    if not target_dir.is_dir():
        raise UserError(f"output folder does not exist: {target_dir}")
    if not os.access(target_dir, os.W_OK):
        raise UserError(f"output folder is not writable: {target_dir}")
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = path.name + ".data" if external_data else None
    try:
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target_dir))
    except OSError as exc:
        raise UserError(f"cannot write to output folder {target_dir}: {exc.strerror}") from exc
    try:
        staged_model = staging / path.name
        ir.save(model, staged_model, external_data=data_name)
        if data_name is not None:
            os.replace(staging / data_name, target_dir / data_name)
        os.replace(staged_model, path)
    except OSError as exc:
        raise UserError(f"cannot write output model {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
