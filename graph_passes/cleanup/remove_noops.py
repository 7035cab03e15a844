"""Remove nodes that hand their input back unchanged."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import (
    GraphPass,
    can_replace,
    constant_array,
    constant_tensor,
    is_standard,
    replace_value,
)
from graph_passes.shapes import infer_shapes

logger = logging.getLogger(__name__)

# An end at least this large takes a whole dimension, whatever its size at run time.
HUGE_END = 2**62


def _dims(value: ir.Value) -> list[int | None] | None:
    """Static dims of ``value`` (None for each dynamic one), or None when the rank is unknown."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _identity(node: ir.Node) -> bool:
    return True


def _dropout(node: ir.Node) -> bool:
    training = _input(node, 2)
    if training is not None:
        flag = constant_array(training)
        if flag is None or bool(flag.any()):
            return False
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    return mask is None or (not mask.uses() and not mask.is_graph_output())


def _cast(node: ir.Node) -> bool:
    dtype = node.inputs[0].dtype
    return dtype is not None and node.attributes.get_int("to", -1) == dtype.value


def _cast_like(node: ir.Node) -> bool:
    target = _input(node, 1)
    dtype = node.inputs[0].dtype
    return target is not None and dtype is not None and target.dtype == dtype


def _reshape(node: ir.Node) -> bool:
    target, dims = constant_array(_input(node, 1)), _dims(node.inputs[0])
    if target is None or dims is None or target.shape != (len(dims),):
        return False
    allowzero = node.attributes.get_int("allowzero", 0)
    infer = [i for i, t in enumerate(target.tolist()) if t == -1]
    for i, (t, d) in enumerate(zip(target.tolist(), dims, strict=True)):
        if t == 0 and not allowzero:
            continue  # copies the input dim, whatever it is
        if t == -1 and len(infer) == 1:
            others = dims[:i] + dims[i + 1 :]
            if any(o is None or o == 0 for o in others):
                return False  # -1 resolves to dims[i] only when the rest is known, nonzero
            continue
        if d is None or t != d:
            return False
    return True


def _transpose(node: ir.Node) -> bool:
    perm = node.attributes.get_ints("perm", None)
    if perm is None:
        dims = _dims(node.inputs[0])
        return dims is not None and len(dims) <= 1
    return list(perm) == list(range(len(perm)))


def _pad(node: ir.Node) -> bool:
    if node.attributes.get_string("mode", "constant") != "constant":
        return False
    if "pads" in node.attributes:  # Pad-2
        pads = np.array(node.attributes.get_ints("pads"))
    else:
        pads = constant_array(_input(node, 1))
    return pads is not None and not pads.any()


def _slice(node: ir.Node) -> bool:
    dims = _dims(node.inputs[0])
    if dims is None or len(node.inputs) < 3 or any(v is None for v in node.inputs[1:]):
        return False  # Slice-1 (attributes) or an omitted axes before steps: rare, skipped
    params = [constant_array(v) for v in node.inputs[1:5]]
    if any(p is None for p in params):
        return False
    starts, ends = params[0].reshape(-1), params[1].reshape(-1)
    axes = params[2].reshape(-1) if len(params) > 2 else np.arange(len(starts))
    steps = params[3].reshape(-1) if len(params) > 3 else np.ones(len(starts), np.int64)
    if not len(starts) == len(ends) == len(axes) == len(steps) or np.any(steps != 1):
        return False
    for start, end, axis in zip(starts.tolist(), ends.tolist(), axes.tolist(), strict=True):
        if not -len(dims) <= axis < len(dims):
            return False
        dim = dims[axis]
        if start != 0 and not (dim is not None and start <= -dim):
            return False
        if end < HUGE_END and (dim is None or end < dim):
            return False
    return True


def _expand(node: ir.Node) -> bool:
    shape, dims = constant_array(_input(node, 1)), _dims(node.inputs[0])
    return shape is not None and dims is not None and _broadcast_keeps(shape.tolist(), dims)


def _tile(node: ir.Node) -> bool:
    repeats = constant_array(_input(node, 1))
    return repeats is not None and bool(np.all(repeats == 1))


def _broadcast_keeps(other: list[int], dims: list[int | None]) -> bool:
    """Whether broadcasting a tensor of shape ``dims`` with shape ``other`` keeps ``dims``."""
    if len(other) > len(dims):
        return False
    return all(o == 1 or o == d for o, d in zip(other[::-1], dims[::-1], strict=False))


# op -> (positions the neutral constant may take, its value)
NEUTRAL = {"Mul": ((1, 0), 1), "Add": ((1, 0), 0), "Sub": ((1,), 0), "Div": ((1,), 1)}


def _arithmetic_input(node: ir.Node) -> ir.Value | None:
    """For ``x op c`` with a neutral constant ``c``, the value ``x``; else None."""
    positions, neutral = NEUTRAL[node.op_type]
    if len(node.inputs) != 2 or None in node.inputs:
        return None
    for position in positions:
        x, const = node.inputs[1 - position], node.inputs[position]
        tensor, dims = constant_tensor(const), _dims(x)
        if tensor is None or x.dtype is None or dims is None or tensor.dtype != x.dtype:
            continue
        array = tensor.numpy()
        if np.all(array == neutral) and _broadcast_keeps(list(array.shape), dims):
            return x
    return None


RULES: dict[str, Callable[[ir.Node], bool]] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Pad": _pad,
    "Slice": _slice,
    "Expand": _expand,
    "Tile": _tile,
}


class RemoveNoops(GraphPass):
    """Remove nodes that return their input unchanged (Identity, x*1, same-type Cast, ...).

    Exporters leave Identity nodes, inference-mode Dropout, Casts to the type a tensor already
    has, Reshapes to its own shape, identity Transposes, zero Pads, full Slices, Expand/Tile by
    ones and arithmetic with neutral constants (``x*1``, ``x+0``, ``x-0``, ``x/1``, ``1*x``,
    ``0+x``). Each one costs a kernel launch and a copy, and hides patterns from fusions::

        before:  a = Identity(x); b = Cast<to=FLOAT>(a); c = Mul(b, ones[4]); y = Relu(c)
        after:   y = Relu(x)                                            (x: float[N, 4])

    A node is only removed when that is exact: the constant must be a true constant (not an
    initializer that is also a graph input), arithmetic needs equal dtypes and a constant that
    broadcasting cannot use to grow ``x`` (``x[3] * ones[2, 3]`` has shape ``[2, 3]`` and stays),
    and shape-dependent rules trust only static integer dims. ``x + 0`` turns ``-0.0`` into
    ``+0.0``, which compares equal; everything else is bit-exact. A graph output produced from a
    graph input (or another output) keeps its node, since the output's name must not change.
    """

    name: ClassVar[str] = "remove_noops"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        infer_shapes(model)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        for graph in model.graphs():
            for node in list(graph):
                source = self._source(node, opset)
                if source is None:
                    continue
                output = node.outputs[0]
                if output.dtype is not None and source.dtype not in (None, output.dtype):
                    continue
                if not can_replace(output, source):
                    continue
                replace_value(output, source)
                graph.remove(node, safe=True)
                self.matches += 1
                logger.debug("removed no-op %s %s", node.op_type, node.name)
        return self.result(model)

    @staticmethod
    def _source(node: ir.Node, opset: int) -> ir.Value | None:
        """The input a no-op node passes through, or None when it is not a no-op."""
        if not is_standard(node) or not node.inputs or node.inputs[0] is None:
            return None
        if node.op_type == "Dropout" and (node.version or opset) < 7:
            if node.attributes.get_int("is_test", 0) != 1:
                return None  # Dropout-1/6 runs in training mode unless is_test=1
        if node.op_type in NEUTRAL:
            return _arithmetic_input(node)
        rule = RULES.get(node.op_type)
        return node.inputs[0] if rule is not None and rule(node) else None
