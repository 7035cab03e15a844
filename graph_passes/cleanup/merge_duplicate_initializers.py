"""Merge initializers that hold the same tensor (dtype, shape and bytes), graph by graph."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from graph_passes.base import GraphPass

logger = logging.getLogger(__name__)


def _data(tensor: ir.TensorProtocol) -> np.ndarray | bytes:
    """The tensor's content as flat bytes, a view of the (memory-mapped) data when it can be."""
    if tensor.dtype == ir.DataType.STRING:
        strings = tensor.string_data()  # type: ignore[attr-defined]
        return b"".join(len(s).to_bytes(8, "little") + s for s in strings)
    array = tensor.numpy()
    try:
        return np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    except (TypeError, ValueError):
        return tensor.tobytes()


def _equal(a: np.ndarray | bytes, b: np.ndarray | bytes) -> bool:
    if isinstance(a, bytes) or isinstance(b, bytes):
        return bytes(a) == bytes(b)
    return a.shape == b.shape and bool(np.array_equal(a, b))


class MergeDuplicateInitializers(GraphPass):
    """Merge initializers with identical dtype, shape and bytes, in each graph separately.

    Tied weights (shared embeddings, repeated constant tables) are stored once and every
    consumer, subgraphs included, reads the surviving initializer; afterwards CSE can merge
    nodes that became identical. Written instead of wrapping onnx-ir's
    ``DeduplicateHashedInitializersPass`` (which is correct) because that one hashes every
    initializer, reading all the weights of a memory-mapped multi-GB model even when no two
    share a dtype and shape, logs a warning for every initializer that is a graph input, and
    does not count its merges. Here initializers are grouped by (dtype, shape) first, only
    groups of two or more are hashed (SHA-256 of the raw bytes) and equal digests are
    confirmed byte for byte.

    Never merged away: initializers that are graph inputs (a caller may override them, so
    they are not constants) and initializers that are graph outputs (their names are the
    signature; one may survive and absorb equal initializers). Graphs are not merged with
    each other. ``matches`` counts removed initializers.
    """

    name = "merge_duplicate_initializers"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        for graph in model.graphs():
            self._graph(graph)
        return self.result(model)

    def _graph(self, graph: ir.Graph) -> None:
        groups: dict[tuple[ir.DataType, tuple[int, ...]], list[ir.Value]] = defaultdict(list)
        for value in graph.initializers.values():
            tensor = value.const_value
            if value.is_graph_input() or tensor is None:
                continue
            groups[(tensor.dtype, tuple(int(d) for d in tensor.shape.numpy()))].append(value)
        for candidates in groups.values():
            if len(candidates) < 2:
                continue
            # Graph outputs cannot be removed, so they go first and survive.
            candidates.sort(key=lambda v: not v.is_graph_output())
            kept: dict[bytes, list[tuple[ir.Value, np.ndarray | bytes]]] = defaultdict(list)
            for value in candidates:
                assert value.const_value is not None
                data = _data(value.const_value)
                digest = hashlib.sha256(data).digest()
                same = next((k for k, d in kept[digest] if _equal(d, data)), None)
                if same is None or value.is_graph_output():
                    kept[digest].append((value, data))
                    continue
                value.replace_all_uses_with(same)
                assert value.name is not None
                del graph.initializers[value.name]
                self.matches += 1
                logger.debug("merged initializer %s into %s", value.name, same.name)
