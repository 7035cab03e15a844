"""Helpers every pattern matcher needs: is this node that op, who produces this value, is this
operand the constant we expect, and how a matched pattern is swapped for its fused node.

They live here, not in one of the passes, so that a pass never imports another pass (layout
rule in docs/architecture.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graph_passes.base import (
    can_replace,
    constant_array,
    constant_tensor,
    is_standard,
    replace_value,
)
from graph_passes.shapes import Dims

# The float types a norm or activation pattern is fused for (ORT has kernels for all three).
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
RTOL = 1e-4  # default relative tolerance when a pattern's constant is compared to its value
INF = float("inf")
# Clip's min/max became optional inputs (instead of float attributes) in opset 11.
CLIP_INPUTS_OPSET = 11


def opset_of(model: ir.Model) -> int:
    """The model's default-domain opset (0 when it imports none)."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def is_op(node: ir.Node | None, *ops: str) -> bool:
    """``node`` is a standard-domain node of one of ``ops``."""
    return node is not None and node.op_type in ops and is_standard(node)


def producer(value: ir.Value | None, *ops: str) -> ir.Node | None:
    """The producer of ``value`` when it is a standard node of one of ``ops``."""
    node = None if value is None else value.producer()
    return node if is_op(node, *ops) else None


def is_scalar_const(value: ir.Value | None, expected: float, rtol: float = RTOL) -> bool:
    """``value`` is a true constant of one element, rank <= 1, close to ``expected``."""
    array = constant_array(value)
    if array is None or array.size != 1 or array.ndim > 1:
        return False
    number = float(np.asarray(array, dtype=np.float64).reshape(-1)[0])
    return math.isfinite(number) and abs(number - expected) <= rtol * abs(expected)


def split_const(node: ir.Node | None, expected: float) -> ir.Value | None:
    """For a binary ``node`` with one operand the constant ``expected``: the other operand."""
    if node is None or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if is_scalar_const(b, expected):
        return a
    if is_scalar_const(a, expected):
        return b
    return None


def only_use(value: ir.Value) -> ir.Node | None:
    """The single consumer of ``value`` (None when it has 0 or 2+ uses or is a graph output)."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def probe_node(
    domain: str, op: str, inputs: Sequence[ir.Value | None], attrs=(), num_outputs: int = 1
) -> ir.Node:
    """A detached node like the one a fusion wants to emit, for ``Target.supports`` and
    ``Target.rewrite_pays``.

    Its inputs are fresh values with the same types, shapes and constant tensors, so
    building it does not add uses to the graph's values.
    """
    copies = [
        None
        if v is None
        else ir.Value(name=f"probe{i}", type=v.type, shape=v.shape, const_value=_const(v))
        for i, v in enumerate(inputs)
    ]
    return ir.Node(domain, op, copies, list(attrs), num_outputs=num_outputs)


def _const(value: ir.Value) -> ir.TensorProtocol | None:
    tensor = constant_tensor(value)
    return tensor if tensor is not None else value.const_value


def rewrite(graph: ir.Graph, root: ir.Node, nodes: list[ir.Node], node: ir.Node) -> bool:
    """Put ``node`` in place of the pattern ending at ``root`` (its first output replaces
    ``root``'s); remove the pattern's nodes. False (and nothing changed) when not possible."""
    y = root.outputs[0]
    out = node.outputs[0]
    out.type, out.shape = y.type, y.shape
    graph.insert_before(root, node)
    if not can_replace(y, out):  # cannot happen for a fresh node output; kept for safety
        graph.remove(node)
        return False
    name = y.name
    replace_value(y, out)
    graph.remove(nodes, safe=True)
    out.name = name
    return True


def split_producer(node: ir.Node | None, *ops: str, allow_constant: bool = True):
    """For a binary ``node``: (the input's producer of one of ``ops``, the other input).

    The other input must be a true constant unless ``allow_constant`` is False, in which case
    it is returned as is. ``(None, None)`` when neither order fits.
    """
    if node is None or len(node.inputs) != 2:
        return None, None
    for a, b in (node.inputs, node.inputs[::-1]):
        found = producer(a, *ops)
        if found is not None and (not allow_constant or constant_array(b) is not None):
            return found, b
    return None, None


def ir_dims(value: ir.Value) -> Dims | None:
    """The value's shape from ONNX shape inference: ints, symbol names, None when unknown."""
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in value.shape)


def same_dim(a: int | str | None, b: int | str | None) -> bool:
    """Dims provably equal: equal ints, or the same named symbol."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and a == b


def same_shape(a: Dims | None, b: Dims | None) -> bool:
    """Shapes provably equal (known rank, every dim equal)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(same_dim(x, y) for x, y in zip(a, b, strict=True))


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def clip_range(node: ir.Node, opset: int) -> tuple[float, float, np.dtype | None] | None:
    """``(lo, hi, dtype of a bound)`` of a standard Relu or Clip, None when not constant."""
    if not is_standard(node) or len(node.outputs) != 1:
        return None
    if node.op_type == "Relu":
        return 0.0, INF, None
    if node.op_type != "Clip":
        return None
    if (node.version or opset) < CLIP_INPUTS_OPSET:
        # The attribute defaults are float lowest/max: as good as infinite for float data.
        return _attr_float(node, "min", -INF), _attr_float(node, "max", INF), None
    bounds: list[float] = [-INF, INF]
    dtype = None
    for i in (1, 2):
        value = node.inputs[i] if len(node.inputs) > i else None
        if value is None:
            continue
        array = constant_array(value)
        if array is None or array.size != 1:
            return None
        dtype = array.dtype
        bounds[i - 1] = float(array.reshape(()).item())
    if any(np.isnan(b) for b in bounds):
        return None
    return bounds[0], bounds[1], dtype


def fresh_name(base: str, names: set[str]) -> str:
    """``base`` or ``base_N``, whichever is not in ``names`` first; added to ``names``."""
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def new_initializer(graph: ir.Graph, names: set[str], base: str, array: np.ndarray) -> ir.Value:
    """A fresh initializer holding ``array``, named ``base`` or ``base_N`` (not in ``names``)."""
    name = fresh_name(base, names)
    value = ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def all_names(model: ir.Model) -> set[str]:
    """Every value name in the model (for choosing fresh initializer names)."""
    names: set[str] = set()
    for graph in model.graphs():
        values = [
            *graph.inputs,
            *graph.initializers.values(),
            *(v for n in graph for v in n.outputs),
        ]
        names.update(v.name for v in values if v.name)
    return names
