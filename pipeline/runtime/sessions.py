"""ONNX Runtime sessions over in-memory onnx-ir models.

Creating a session is a visible, timed step (Polygraphy's runner idea). A model is handed to
ONNX Runtime as bytes when all its tensor data is in memory; when some initializers live in
external files, the model is written beside those files (see ``model_on_disk``), so a
multi-GB model is never copied or serialized as one protobuf.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from pipeline.runtime import opaque_types
from pipeline.runtime.proto_size import fits_one_message
from pipeline.runtime.scratch_weights import in_memory_initializers, owned_prefix, remove_stale

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Outputs = dict[str, object]  # numpy arrays, or lists/dicts for sequence and map outputs

OPT_LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class Session:
    """An ONNX Runtime session plus how long it took to create."""

    inner: ort.InferenceSession
    create_seconds: float

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.inner.get_outputs()]

    def run(self, feeds: Feeds) -> Outputs:
        """Run once; feeds the model does not take are dropped (user data may carry extras)."""
        wanted = {i.name for i in self.inner.get_inputs()}
        results = self.inner.run(None, {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(self.output_names, results, strict=True))


def has_external_tensors(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor)
        for g in model.graphs()
        for v in g.initializers.values()
    )


def save_self_contained(model: ir.Model, path: Path) -> None:
    """Save ``model`` so that ``path`` loads from its own folder: tensors that live in
    another model's data file (a large model's weights stay on disk) are streamed into
    ``PATH.data`` beside it; a model held in memory is one file. Saving such a model
    plainly would write references to a data file that is not beside ``path``."""
    path = Path(path)
    external = f"{path.name}.data" if has_external_tensors(model) else None
    ir.save(model, path, external_data=external)


def delete_saved(path: Path) -> None:
    """Remove a model written by ``save_self_contained`` and its data file, if any."""
    path = Path(path)
    for file in (path, path.with_name(f"{path.name}.data")):
        file.unlink(missing_ok=True)


def _external_folders(model: ir.Model) -> set[Path]:
    return {
        Path(v.const_value.base_dir).resolve()
        for g in model.graphs()
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }


@contextlib.contextmanager
def model_on_disk(model: ir.Model) -> Iterator[Path]:
    """Yield a path to a loadable copy of ``model``; external data is never copied if avoidable.

    ONNX Runtime resolves external data relative to the model file and refuses paths that
    leave the model's folder, symbolic links included. So the model is written as a hidden
    temporary file INTO the folder that holds its external data (the data files are then
    found as they are), and removed afterwards, together with a data file beside it that holds
    the model's large in-memory tensors (those a pass made) for as long as ONNX Runtime loads
    it. Where that folder is not writable, a scratch folder gets hard links to the data
    files, or copies as a last resort.
    """
    folders = _external_folders(model)
    if len(folders) == 1 and os.access(next(iter(folders)), os.W_OK):
        folder = next(iter(folders))
        for suffix in (".onnx", ".data"):
            remove_stale(folder, _TEMP_KIND, suffix)
        fd, name = tempfile.mkstemp(prefix=owned_prefix(_TEMP_KIND), suffix=".onnx", dir=folder)
        path = Path(name)
        sidecar = path.with_suffix(".data")
        try:
            with _large_tensors_in(model, sidecar):
                proto = opaque_types.to_proto(model)
            with os.fdopen(fd, "wb") as handle:
                handle.write(proto.SerializeToString())
            del proto
            yield path
        finally:
            path.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
        return
    proto = opaque_types.to_proto(model)
    small = fits_one_message(proto)
    scratch = Path(tempfile.mkdtemp(prefix="ovo-run-"))
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    _link_external_file(value.const_value, scratch)
        path = scratch / "model.onnx"
        if small:
            path.write_bytes(proto.SerializeToString())
        else:
            ir.save(model, path, external_data="model.onnx.data")
        yield path
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# In-memory tensors from this size up go to a data file beside the temporary model instead of
# into its protobuf (where they would be copied twice more: into the message, then into bytes).
SIDECAR_MIN_BYTES = 1 << 20


@contextlib.contextmanager
def _large_tensors_in(model: ir.Model, data_path: Path) -> Iterator[None]:
    """While ``model`` is serialized for a session, its large in-memory initializers are
    external tensors in ``data_path`` (written now, page-aligned so ONNX Runtime can map
    them); the model gets its own tensors back afterwards, unchanged."""
    values = in_memory_initializers(model, SIDECAR_MIN_BYTES)
    if not values:
        yield
        return
    kept = [value.const_value for value in values]
    external = ir.external_data.convert_tensors_to_external(
        kept, data_path.parent, data_path.name, alignment=4096
    )
    try:
        for value, tensor in zip(values, external, strict=True):
            value.const_value = tensor
        yield
    finally:
        for value, tensor in zip(values, kept, strict=True):
            value.const_value = tensor


# Temporary models written beside the user's external data are named
# ``.ovo-run-<host>-<pid>-<random>.onnx``: a process killed while ONNX Runtime loads one
# cannot remove it, so the next run in that folder removes those whose process is gone.
_TEMP_KIND = "run"


def _link_external_file(tensor: ir.ExternalTensor, scratch: Path) -> None:
    source = (Path(tensor.base_dir) / tensor.location).resolve()
    link = scratch / tensor.location
    if link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, link)
    except OSError:
        shutil.copyfile(source, link)


# ONNX Runtime's own C++ log (severity: 0 verbose ... 3 error, 4 fatal). Its error lines
# come with ANSI colours and a source location, and the exception raised right after says
# the same thing, which the command line turns into its one-line message; so the command
# line silences the log (``silence_onnxruntime_log``) and ``--debug`` leaves it on. Library
# use (tests, the CI job, the provider probe that parses the log) keeps each caller's level.
_SILENT = 4
_silenced = False


def silence_onnxruntime_log(silent: bool = True) -> None:
    """Silence ONNX Runtime's log for this process (sessions made here and by other
    libraries, e.g. the quantization tools), or give it back its default (warnings)."""
    global _silenced
    _silenced = silent
    ort.set_default_logger_severity(_SILENT if silent else 2)


def open_session(
    source: str | bytes | os.PathLike,
    options: ort.SessionOptions | None = None,
    providers: list | None = None,
    **kwargs,
) -> ort.InferenceSession:
    """The one place an ONNX Runtime session is created (a path or serialized bytes).

    Everything that runs a model (verification, timing, kernel probes, benchmarks, the
    provider probe) comes through here, so how sessions are made is decided once.
    ``kwargs`` go to ``InferenceSession`` (``disabled_optimizers``, ``provider_options``).
    """
    if isinstance(source, os.PathLike):
        source = str(source)
    if _silenced:
        options = options or ort.SessionOptions()
        options.log_severity_level = _SILENT
    return ort.InferenceSession(
        source, options, providers=providers or ["CPUExecutionProvider"], **kwargs
    )


def create_session(
    model: ir.Model | Path,
    *,
    optimization: str = "disable_all",
    providers: list[str] | None = None,
    intra_op_threads: int | None = None,
) -> Session:
    """Create an ONNX Runtime session for ``model`` (CPU unless providers are given).

    ``model`` may be a file: ONNX Runtime then reads it (and its external data) itself, with
    no Python copy of the weights, where a loaded model handed over as serialized bytes
    briefly holds three (the model, the proto and the bytes: 1.6 GB beside ORT's own for
    SmolLM2-135M)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS[optimization]
    options.log_severity_level = 3
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    start = time.perf_counter()
    if isinstance(model, Path):
        inner = open_session(model, options, providers)
    elif has_external_tensors(model):
        with model_on_disk(model) as path:
            inner = open_session(path, options, providers)
    else:
        inner = open_session(opaque_types.to_proto(model).SerializeToString(), options, providers)
    return Session(inner, time.perf_counter() - start)


def run_all(session: Session, input_sets: list[Feeds]) -> list[Outputs]:
    """Run the session on every input set, in order."""
    return [session.run(feeds) for feeds in input_sets]
