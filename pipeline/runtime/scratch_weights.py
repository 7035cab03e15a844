"""A large model's weights on disk while it is optimized, so they are held once, memory-mapped.

A model whose weights sit inside its ``.onnx`` file must be parsed whole (protobuf has no
partial read), and every ONNX Runtime session made from an in-memory model gets it as one
serialized protobuf and copies the weights again. On a 650 MB decoder that made a run peak at
8x the model. So a large model's weights are written once to a hidden folder beside the
output (``.ovo-weights-<host>-<pid>-<random>/``, never into the input's folder, never into
``/tmp``, which may be memory) and the model refers to them as external data: onnx-ir maps
them when a pass reads them, ONNX Runtime maps them instead of copying, and the parsed
protobuf is freed. Tensors that passes create later (packed weights, folded constants) are
written there too before the next session (``spill``). The folder goes when the run ends;
one left by a killed run is removed by the next run in the same folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

# Models with a file at least this large have their weights moved to disk (the cost is one
# sequential write of the weights; the gain is one copy fewer in every session).
SPILL_FILE_BYTES = 256 * 1024 * 1024
# Tensors below this stay in the protobuf (a Constant's scalars, shapes, small biases).
MIN_TENSOR_BYTES = 1024
_KIND = "weights"


def owned_prefix(kind: str) -> str:
    """``.ovo-<kind>-<host>-<pid>-``: a temporary name that says which process owns it."""
    return f".ovo-{kind}-{socket.gethostname()}-{os.getpid()}-"


def remove_stale(folder: Path, kind: str, suffix: str = "") -> None:
    """Delete ``.ovo-<kind>-*<suffix>`` entries of ``folder`` left by killed runs on this host
    (their owner process is gone); entries of live processes and other hosts stay."""
    host, head = socket.gethostname(), f".ovo-{kind}-"
    for path in folder.glob(f"{head}*{suffix}"):
        stem = path.name[len(head) : len(path.name) - len(suffix)]
        owner, _, rest = stem.rpartition("-")
        found_host, _, pid = owner.rpartition("-")
        if found_host != host or not pid.isdigit() or not rest or _alive(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def in_memory_initializers(model: ir.Model, min_bytes: int) -> list[ir.Value]:
    """Initializers of every graph whose tensor is in memory (not external) and at least
    ``min_bytes`` large: what would otherwise be copied into a serialized protobuf."""
    return [
        value
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
        and not isinstance(value.const_value, ir.ExternalTensor)
        and value.const_value.nbytes >= min_bytes
    ]


class ScratchWeights:
    """The hidden weights folder of one run (created on first use, removed by ``close``)."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent.resolve()  # tensors keep this folder: a later chdir must not matter
        self._folder: Path | None = None
        self._files = 0

    @property
    def in_use(self) -> bool:
        """Whether the model's weights went to disk (a large model)."""
        return self._folder is not None

    @property
    def folder(self) -> Path:
        if self._folder is None:
            remove_stale(self.parent, _KIND)
            self._folder = Path(tempfile.mkdtemp(prefix=owned_prefix(_KIND), dir=self.parent))
        return self._folder

    def _next_data_file(self) -> str:
        self._files += 1
        return f"weights-{self._files}.data"

    def externalize_proto(self, proto: onnx.ModelProto) -> Path:
        """Write ``proto`` with its initializers as external data into the folder and return
        the model file's path. ``proto`` loses its tensor bytes; the caller drops it and
        loads the small file instead, so the parsed protobuf's memory is freed."""
        path = self.folder / "model.onnx"
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=self._next_data_file(),
            size_threshold=MIN_TENSOR_BYTES,
        )
        return path

    def spill(self, model: ir.Model) -> int:
        """Move the in-memory initializers of ``model`` (at least ``MIN_TENSOR_BYTES``) to a
        new data file in the folder; they are memory-mapped from then on. Returns how many.
        Only a run whose model went to disk at load spills (small models stay in memory)."""
        if not self.in_use:
            return 0
        values = in_memory_initializers(model, MIN_TENSOR_BYTES)
        if not values:
            return 0
        external = ir.external_data.convert_tensors_to_external(
            [value.const_value for value in values], self.folder, self._next_data_file()
        )
        for value, tensor in zip(values, external, strict=True):
            value.const_value = tensor
        return len(values)

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


@contextlib.contextmanager
def scratch_weights(parent: Path):
    """``ScratchWeights`` for a run writing into ``parent``, removed however the run ends."""
    scratch = ScratchWeights(parent)
    try:
        yield scratch
    finally:
        scratch.close()
