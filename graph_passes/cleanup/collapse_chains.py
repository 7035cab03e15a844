"""Collapse two consecutive shape-only ops of the same kind into one.

Exporters emit one op per Python call, so ``x[None, :, None]`` or ``t.unsqueeze(0).unsqueeze(1)``
becomes a chain (torch dynamo on BERT: ``u1 = Unsqueeze(arange, [0]); u2 = Unsqueeze(u1, [1])``).
When the first node's output has no other use and is not a graph output, the second node is
rewritten to read ``x`` directly and the first is removed::

    before:  m = Unsqueeze(x, [1]);     y = Unsqueeze(m, [0, 3])    x: [N, 3] -> y: [1, N, 1, 1, 3]
    after:   y = Unsqueeze(x, [0, 2, 3])

The math, with every axis normalized to ``0 <= axis < rank`` of the tensor it refers to:

- Unsqueeze: ``a2`` lives in output space; the output positions not in ``a2`` hold the dims of
  ``m`` in order (``kept``), so ``m``'s inserted axis ``j`` lands at ``kept[j]`` and
  ``a = sorted(a2 | {kept[j] for j in a1})``. Above: kept = [1, 2, 4], a1 = [1] -> 2.
- Squeeze: the mirror image in input space: ``kept`` = input positions not in ``a1`` (the
  dims of ``m`` in order), ``a = sorted(a1 | {kept[j] for j in a2})``. Squeeze without axes
  (drop every 1) depends on runtime shapes and is left alone.
- Transpose: ``y[i] = m[p2[i]] = x[p1[p2[i]]]``, so ``p[i] = p1[p2[i]]``. An identity result
  stays a Transpose for ``remove_noops``. Transpose without ``perm`` is left alone.
- Reshape: the second shape decides alone when it is a constant without 0 (0 copies a dim of
  ``m``, which ``x`` may not have) or the second Reshape has ``allowzero=1``; -1 is fine since
  the element count never changes.

Axes are an attribute before opset 13 and a constant input from opset 13 (a new int64
initializer, named after the output, in the node's graph; the old one is left to
``remove_dead``). Negative axes need the rank of ``x`` (from shape inference); when it is
unknown the chain stays. Both nodes must be in the same graph; every graph (If/Loop bodies
included) is visited. Graph outputs keep their name, type and shape: only the second node's
inputs change.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import GraphPass, constant_array, is_standard
from graph_passes.shapes import infer_shapes

logger = logging.getLogger(__name__)

# Squeeze and Unsqueeze took ``axes`` as an input instead of an attribute from opset 13.
AXES_INPUT_OPSET = 13


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _axes(node: ir.Node, opset: int) -> list[int] | None:
    """The node's constant axes, or None when absent or not constant."""
    if (node.version or opset) < AXES_INPUT_OPSET:
        axes = node.attributes.get_ints("axes", None)
        return None if axes is None else list(axes)
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    array = constant_array(node.inputs[1])
    return None if array is None or array.ndim > 1 else [int(a) for a in array.reshape(-1)]


def _normalize(axes: list[int], rank: int | None) -> list[int] | None:
    """Axes made non-negative for ``rank``; None when that needs an unknown rank or is invalid."""
    if rank is None:
        return axes if all(a >= 0 for a in axes) and len(set(axes)) == len(axes) else None
    out = [a + rank if a < 0 else a for a in axes]
    return out if all(0 <= a < rank for a in out) and len(set(out)) == len(out) else None


def _merge(outer: list[int], inner: list[int], rank: int) -> list[int]:
    """``outer`` axes of a rank-``rank`` tensor plus ``inner`` axes counted among the others."""
    kept = [i for i in range(rank) if i not in outer]
    return sorted(set(outer) | {kept[j] for j in inner})


class CollapseChains(GraphPass):
    """Merge Unsqueeze->Unsqueeze, Squeeze->Squeeze, Transpose->Transpose, Reshape->Reshape."""

    name: ClassVar[str] = "collapse_chains"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        infer_shapes(model)
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        self._names = {v.name for g in model.graphs() for v in _values(g) if v.name}
        for graph in model.graphs():
            for second in list(graph):
                mid = second.inputs[0] if second.inputs else None
                first = mid.producer() if mid is not None else None
                if (
                    first is None
                    or first.op_type != second.op_type
                    or not (is_standard(first) and is_standard(second))
                    or first.graph is not graph
                    or mid.is_graph_output()
                    or len(mid.uses()) != 1
                    or not self._rewrite(first, second, graph)
                ):
                    continue
                second.replace_input_with(0, first.inputs[0])
                graph.remove(first, safe=True)
                self.matches += 1
                logger.debug("collapsed %s %s into %s", first.op_type, first.name, second.name)
        return self.result(model)

    def _rewrite(self, first: ir.Node, second: ir.Node, graph: ir.Graph) -> bool:
        """Give ``second`` the combined parameters; False (and nothing changed) if it can't."""
        op = second.op_type
        if op == "Transpose":
            p1, p2 = (
                first.attributes.get_ints("perm", None),
                second.attributes.get_ints("perm", None),
            )
            if p1 is None or p2 is None or not sorted(p1) == sorted(p2) == list(range(len(p1))):
                return False
            second.attributes["perm"] = ir.AttrInt64s("perm", [p1[i] for i in p2])
            return True
        if op == "Reshape":
            shape = constant_array(second.inputs[1] if len(second.inputs) > 1 else None)
            return shape is not None and (
                second.attributes.get_int("allowzero", 0) == 1 or not np.any(shape == 0)
            )
        if op not in ("Squeeze", "Unsqueeze"):
            return False
        a1, a2 = _axes(first, self._opset), _axes(second, self._opset)
        if a1 is None or a2 is None:
            return False
        rank = _rank(first.inputs[0])
        sign = 1 if op == "Unsqueeze" else -1
        r1 = None if rank is None else rank + sign * len(a1)  # rank of the middle tensor
        r2 = None if r1 is None else r1 + sign * len(a2)  # rank of the output
        if op == "Unsqueeze":  # a1 in middle space, a2 in output space
            a1, a2 = _normalize(a1, r1), _normalize(a2, r2)
            merge_rank, outer, inner = r2, a2, a1
        else:  # a1 in input space, a2 in middle space
            a1, a2 = _normalize(a1, rank), _normalize(a2, r1)
            merge_rank, outer, inner = rank, a1, a2
        if outer is None or inner is None:
            return False
        if merge_rank is None:  # all axes non-negative: the smallest rank that holds them
            merge_rank = max([*outer, len(outer) + max(inner, default=-1)]) + 1
        self._set_axes(second, graph, _merge(outer, inner, merge_rank))
        return True

    def _set_axes(self, node: ir.Node, graph: ir.Graph, axes: list[int]) -> None:
        if (node.version or self._opset) < AXES_INPUT_OPSET:
            node.attributes["axes"] = ir.AttrInt64s("axes", axes)
            return
        base = f"{node.outputs[0].name or node.name or node.op_type}_axes"
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        value = ir.Value(
            name=name,
            type=ir.TensorType(ir.DataType.INT64),
            shape=ir.Shape([len(axes)]),
            const_value=ir.tensor(np.array(axes, dtype=np.int64), name=name),
        )
        graph.register_initializer(value)
        node.replace_input_with(1, value)


def _values(graph: ir.Graph) -> list[ir.Value]:
    return [*graph.inputs, *graph.initializers.values(), *(v for n in graph for v in n.outputs)]
