"""Fold ``Shape`` / ``Size`` of statically known dimensions into constants, and
``CastLike`` of a statically known dtype into ``Cast``."""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import GraphPass, can_replace, constant_array, is_standard, replace_value
from graph_passes.shapes import infer_shapes

logger = logging.getLogger(__name__)


def _static_dims(value: ir.Value, start: int = 0, end: int | None = None) -> list | None:
    """The dims of ``value`` that ``Shape(value, start, end)`` returns (int or None each),
    or None when the rank is unknown or the value is an overridable initializer."""
    if value.shape is None or (value.is_graph_input() and value.is_initializer()):
        return None
    dims = [d if isinstance(d, int) and d >= 0 else None for d in value.shape]
    rank = len(dims)
    end = rank if end is None else end
    start, end = (max(0, min(rank, i + rank if i < 0 else i)) for i in (start, end))
    return dims[start:end]


def _shape_dims(node: ir.Node) -> list | None:
    """Dims produced by a standard Shape node (see ``_static_dims``)."""
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    return _static_dims(node.inputs[0], start, end)


def _param(value: ir.Value | None, default: int) -> np.ndarray | None:
    """A Slice parameter as a 1-D array: the default when omitted, None when not constant."""
    array = np.array([default]) if value is None else constant_array(value)
    return None if array is None else array.reshape(-1)


def _slice_positions(length: int, node: ir.Node) -> list[int] | None:
    """Positions a 1-D ``Slice`` with constant starts/ends/axes/steps picks, else None."""
    if len(node.inputs) < 3:  # Slice-1 keeps its parameters in attributes
        return None
    inputs = [*node.inputs[1:5], None, None][:4]
    params = [_param(v, default) for v, default in zip(inputs, (0, 0, 0, 1), strict=True)]
    if any(p is None or p.shape != (1,) for p in params):
        return None
    start, end, axis, step = (int(p[0]) for p in params)
    if axis not in (0, -1) or step == 0:
        return None
    start, end = (i + length if i < 0 else i for i in (start, end))
    if step > 0:
        start, end = max(0, min(length, start)), max(0, min(length, end))
    else:
        start, end = max(0, min(length - 1, start)), max(-1, min(length - 1, end))
    return list(range(start, end, step))


def _picked(consumer: ir.Node, dims: list) -> np.ndarray | None:
    """The constant a Gather/Slice consumer of a Shape output computes, when all it picks
    is static."""
    if not is_standard(consumer) or consumer.inputs[0] is None:
        return None
    if consumer.op_type == "Gather" and len(consumer.inputs) == 2:
        indices = constant_array(consumer.inputs[1])
        if indices is None or consumer.attributes.get_int("axis", 0) not in (0, -1):
            return None
        if indices.dtype.kind not in "iu" or np.any(indices >= len(dims)):
            return None
        if np.any(indices < -len(dims)):
            return None
        picked = [dims[int(i)] for i in indices.reshape(-1)]
        shape = indices.shape
    elif consumer.op_type == "Slice":
        positions = _slice_positions(len(dims), consumer)
        if positions is None:
            return None
        picked = [dims[i] for i in positions]
        shape = (len(picked),)
    else:
        return None
    if any(d is None for d in picked):
        return None
    return np.array(picked, dtype=np.int64).reshape(shape)


class FoldShapes(GraphPass):
    """Fold Shape/Size of static dimensions (and Shape->Gather/Slice of static dims).

    Exporters compute shapes at run time even when the dimensions are fixed, which leaves
    ``Shape -> Gather/Slice -> Concat -> Reshape`` chains that keep constant folding and fusions
    from seeing the real target shapes. This pass turns the statically known parts into int64
    constants so the constant folding pass can fold the rest::

        before:  x: float[N, 3, 4]
                 s = Shape(x); d = Gather(s, [2]); t = Concat([-1], d); y = Reshape(x, t)
        after:   d = [4] (initializer);            t = Concat([-1], d); y = Reshape(x, t)

    Only integer dimensions are trusted. A named (``dim_param``) or unknown dimension is dynamic
    and is never baked in: ``Shape`` folds only when every dimension in its ``start``/``end``
    range is static, and ``Shape -> Gather`` / ``Shape -> Slice`` with constant parameters fold
    when the dimensions they pick are static, even if other dimensions of ``x`` are dynamic.
    A new constant is an initializer of the graph holding the node, except when the folded value
    is a graph output: then it is a ``Constant`` node, so the output keeps its name and type.
    """

    name: ClassVar[str] = "fold_shapes"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        infer_shapes(model)
        self._names = {
            v.name
            for g in model.graphs()
            for v in (
                *g.inputs,
                *g.outputs,
                *g.initializers.values(),
                *(o for n in g for o in n.outputs),
            )
            if v.name
        }
        for graph in model.graphs():
            for node in list(graph):
                if node.graph is graph and is_standard(node):
                    self._fold_node(graph, node)
        return self.result(model)

    def _cast_like_to_cast(self, graph: ir.Graph, node: ir.Node) -> None:
        """``CastLike(x, like)`` reads only the (static) dtype of ``like``: it becomes
        ``Cast(x, to=dtype)``, so a constant ``x`` folds and ``like`` is not a dependency
        (the dynamo exporter's ``CastLike(16, q)`` in the attention scale)."""
        like = node.inputs[1] if len(node.inputs) > 1 else None
        if node.inputs[0] is None or like is None or like.dtype is None:
            return
        attrs = [ir.AttrInt64("to", like.dtype.value)]
        if "saturate" in node.attributes:
            attrs.append(node.attributes["saturate"])
        cast = ir.Node("", "Cast", [node.inputs[0]], attrs, num_outputs=1, name=node.name)
        old = node.outputs[0]
        new = cast.outputs[0]
        new.type, new.shape = old.type, old.shape
        graph.insert_before(node, cast)
        if not can_replace(old, new):
            graph.remove(cast, safe=True)
            return
        name = old.name
        replace_value(old, new)
        graph.remove(node, safe=True)
        new.name = name
        self.matches += 1

    def _fold_node(self, graph: ir.Graph, node: ir.Node) -> None:
        if node.op_type == "CastLike" and len(node.inputs) == 2:
            self._cast_like_to_cast(graph, node)
            return
        if node.op_type not in ("Shape", "Size") or not node.inputs or node.inputs[0] is None:
            return
        if node.op_type == "Size":
            dims = _static_dims(node.inputs[0])
            if dims is not None and None not in dims:
                size = np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
                self._replace(graph, node, node.outputs[0], size)
            return
        dims = _shape_dims(node)
        if dims is None:
            return
        if None not in dims:
            self._replace(graph, node, node.outputs[0], np.array(dims, dtype=np.int64))
            return
        before = self.matches
        for consumer in list(node.outputs[0].consumers()):
            if consumer.graph is not graph or consumer.inputs[0] is not node.outputs[0]:
                continue  # a subgraph consumer, or the shape used as indices
            array = _picked(consumer, dims)
            if array is not None:
                self._replace(graph, consumer, consumer.outputs[0], array)
        output = node.outputs[0]
        if self.matches > before and not output.uses() and not output.is_graph_output():
            graph.remove(node, safe=True)  # every use was folded

    def _replace(self, graph: ir.Graph, node: ir.Node, old: ir.Value, array: np.ndarray) -> None:
        """Replace ``old`` (an output of ``node``) with a constant holding ``array``."""
        name = self._unique(f"{old.name or node.op_type}_folded")
        tensor = ir.tensor(array, name=name)
        if old.is_graph_output():
            const = ir.node("Constant", [], {"value": tensor})
            new = const.outputs[0]
        else:
            const = None
            new = ir.Value(name=name, const_value=tensor)
        new.type = ir.TensorType(ir.DataType.INT64)
        new.shape = ir.Shape(array.shape)
        if const is not None:
            graph.insert_before(node, const)
        else:
            graph.register_initializer(new)
        if not can_replace(old, new):  # cannot happen today; keep the graph as it was
            if const is not None:
                graph.remove(const, safe=True)
            else:
                graph.initializers.pop(name)
            return
        replace_value(old, new)
        if not any(out.uses() or out.is_graph_output() for out in node.outputs):
            graph.remove(node, safe=True)
        self.matches += 1
        logger.debug("folded %s %s to %s", node.op_type, old.name, array.tolist())

    def _unique(self, base: str) -> str:
        name, index = base, 0
        while name in self._names:
            index += 1
            name = f"{base}_{index}"
        self._names.add(name)
        return name
