"""Calibration data: the user's, or generated (with a loud note), read lazily with a progress bar.

Memory stays bounded: a folder of ``.npz`` files is read one file per step, never stacked;
ORT's MinMax calibrator is told to merge its intermediate outputs every few batches
(``CalibMaxIntermediateOutputs``) and the histogram calibrators keep histograms only.

The calibration cache (ORT's JSON ``calibration_cache_path``) is keyed by the SHA-256 of the
model being calibrated, the method, the op types calibrated and a digest of the data, so a
changed model, method or dataset never reuses stale ranges. Within one run the guard's
re-quantizations reuse it, so calibration runs once.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.quantization import CalibrationDataReader

from pipeline.runtime.errors import UserError
from pipeline.runtime.inputs import Feeds, generate_input_sets

logger = logging.getLogger(__name__)

GENERATED_SETS = 8
GENERATED_NOTE = (
    "CALIBRATION DATA WAS GENERATED (random inputs): the int8-static ranges, and every "
    "accuracy figure measured on generated inputs, say nothing about real data. Pass "
    "--calibration DIR with real inputs before trusting this model."
)

Source = Feeds | Path  # an in-memory input set, or an .npz file read when needed


def load_sources(folder: Path) -> list[Source]:
    """The input sets in ``folder`` (same layout as ``--inputs``), without reading .npz data.

    Each ``.npz`` is one set (read lazily); all ``.npy`` files together are one set, named
    after the inputs they feed.
    """
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"--calibration path not found: {folder}")
    if folder.is_file():
        if folder.suffix != ".npz":
            raise UserError(f"--calibration expects a folder or an .npz file: {folder}")
        return [folder]
    sources: list[Source] = sorted(folder.glob("*.npz"))
    npy = sorted(folder.glob("*.npy"))
    if npy:
        try:
            sources.append({p.stem: np.load(p, allow_pickle=False) for p in npy})
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read --calibration data in {folder}: {exc}") from exc
    if not sources:
        raise UserError(f"--calibration folder holds no .npz or .npy files: {folder}")
    return sources


def read_source(source: Source) -> Feeds:
    if isinstance(source, dict):
        return source
    try:
        with np.load(source, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read calibration file {source}: {exc}") from exc


def generated_sources(model: onnx.ModelProto, count: int = GENERATED_SETS) -> list[Source]:
    """Random input sets that respect the model's signature (ids in range, masks, 2 sizes)."""
    return list(generate_input_sets(ir.from_proto(model), seed=1234, num_sets=count))


def digest(sources: Iterable[Source]) -> str:
    """SHA-256 over the data (files hashed by content, not by name or time)."""
    hasher = hashlib.sha256()
    for source in sources:
        if isinstance(source, Path):
            with open(source, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    hasher.update(block)
            continue
        for name in sorted(source):
            array = np.ascontiguousarray(source[name])
            hasher.update(f"{name}:{array.dtype}:{array.shape}".encode())
            hasher.update(array.tobytes())
    return hasher.hexdigest()


def model_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the serialized model (the cache key's model part)."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def cache_file(cache_dir: Path, model_hash: str, method: str, data_hash: str, extra: str) -> Path:
    key = hashlib.sha256(f"{model_hash}|{method}|{data_hash}|{extra}".encode()).hexdigest()
    return Path(cache_dir) / f"calibration-{model_hash[:12]}-{method}-{key[:16]}.json"


class FeedsReader(CalibrationDataReader):
    """Hands ORT one input set at a time, converted to the model's input dtypes.

    Args:
        sources: Input sets or .npz paths (read when reached, dropped after).
        inputs: Model input name -> numpy dtype; other keys in the data are ignored, and a
            missing input is a ``UserError`` naming the set.
        label: Shown on the progress bar; no bar when None.
    """

    def __init__(
        self, sources: Sequence[Source], inputs: dict[str, np.dtype], label: str | None = None
    ) -> None:
        self.sources = list(sources)
        self.inputs = inputs
        self.label = label
        self.start, self.end = 0, len(self.sources)
        self.position = 0
        self._progress = None
        self._task = None

    def __len__(self) -> int:
        return len(self.sources)

    def __deepcopy__(self, memo: dict) -> FeedsReader:  # GPTQ copies the reader; bars don't copy
        return FeedsReader(copy.copy(self.sources), dict(self.inputs), None)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.sources))
        self.position = self.start

    def rewind(self) -> None:
        self.position = self.start

    def get_next(self) -> dict | None:
        if self.position >= self.end:
            if self.end >= len(self.sources):  # chunked reads (set_range) share one bar
                self._close()
            return None
        index = self.position
        self.position += 1
        feeds = read_source(self.sources[index])
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise UserError(f"calibration set {index} lacks model input(s) {', '.join(missing)}")
        self._advance()
        return {name: np.asarray(feeds[name]).astype(dtype) for name, dtype in self.inputs.items()}

    def _advance(self) -> None:
        if self.label is None:
            return
        if self._progress is None:
            from rich.console import Console
            from rich.progress import Progress

            self._progress = Progress(console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=len(self.sources))
        self._progress.advance(self._task)

    def _close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def input_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    """Real graph inputs (not initializers) -> numpy dtype."""
    initializers = {i.name for i in model.graph.initializer}
    result = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        elem = value.type.tensor_type.elem_type
        result[value.name] = onnx.helper.tensor_dtype_to_np_dtype(elem)
    return result
