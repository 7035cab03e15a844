"""Fuse the decomposed hard-swish and hard-sigmoid of MobileNetV3-style models.

PyTorch's ``F.hardswish``/``F.hardsigmoid`` export as single ops, but models that write them
by hand (``x * F.relu6(x + 3) / 6``, Keras and Paddle exports) leave four or five nodes::

    before:  a = Add(x, 3);  c = Clip(a, 0, 6);  m = Mul(x, c);  y = Div(m, 6)   (or * 1/6)
    after:   y = HardSwish(x)                                     (opset >= 14)

    before:  a = Add(x, 3);  c = Clip(a, 0, 6);  y = Div(c, 6)                   (or * 1/6)
    after:   y = HardSigmoid(x, alpha=1/6, beta=0.5)

    before:  h = HardSigmoid(x, alpha=1/6, beta=0.5);  y = Mul(x, h)
    after:   y = HardSwish(x)                                     (opset >= 14)

The math: ``HardSigmoid(x) = max(0, min(1, alpha * x + beta))`` and with ``alpha = 1/6``,
``beta = 1/2`` that is ``clip(x + 3, 0, 6) / 6``; ``HardSwish(x) = x * HardSigmoid(x)`` with
exactly those alpha and beta (so a HardSigmoid with other parameters, e.g. PyTorch's
default-free Keras 0.2/0.5 one, is not turned into HardSwish). The rewrite differs from the
decomposition only by float rounding. Constants (3, 0, 6, 1/6) must be true constants of
one element that do not broadcast the data to a higher rank, and equal their expected value
within a relative tolerance (a few ulp of float16, since fp16 models round 1/6). Clip takes
its bounds as attributes before opset 11 and as inputs after. Every intermediate value must
have its single use inside the pattern and not be a graph output; ``x`` itself may have any
uses. Where the opset is below 14 a hand-written hard-swish still gets its HardSigmoid part
fused (``y = Mul(x, HardSigmoid(x))``).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array, is_standard, replace_value
from graph_passes.fusion import Fusion
from graph_passes.match import clip_range

logger = logging.getLogger(__name__)

HARD_SWISH_OPSET = 14
HARD_SIGMOID_OPSET = 6  # opset 1's HardSigmoid still had ``consumed_inputs``
ALPHA, BETA = 1.0 / 6.0, 0.5
FLOAT_TYPES = (ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)


def _close(value: float, expected: float, dtype: np.dtype | None = None) -> bool:
    """Equal within a few ulp of the constant's dtype (float32 at least)."""
    eps = np.finfo(dtype if dtype is not None and dtype.kind == "f" else np.float32).eps
    return bool(np.isclose(value, expected, rtol=max(4 * eps, 1e-6), atol=0.0))


def _inner(value: ir.Value | None, graph: ir.Graph) -> ir.Node | None:
    """The producer of ``value`` when it is a standard node of ``graph`` and ``value`` is
    used once and not a graph output (so the node can go once its user is fused)."""
    if value is None or value.is_graph_output() or len(value.uses()) != 1:
        return None
    node = value.producer()
    if node is None or node.graph is not graph or not is_standard(node):
        return None
    return node


def _scalar(value: ir.Value | None, data: ir.Value) -> float | None:
    """The constant one-element ``value`` as a float when broadcasting it onto ``data`` keeps
    ``data``'s shape, else None."""
    array = constant_array(value)
    if array is None or array.size != 1 or array.dtype.kind != "f":
        return None
    if array.ndim and (data.shape is None or array.ndim > len(data.shape)):
        return None
    return float(array.reshape(()).item())


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a two-input node one of whose inputs is ``value``."""
    a, b = node.inputs
    return b if a is value else a


class FuseHardSwish(Fusion):
    """Fuse ``x * clip(x + 3, 0, 6) / 6`` into HardSwish and ``clip(x + 3, 0, 6) / 6`` into
    HardSigmoid; also ``x * HardSigmoid(x)`` into HardSwish."""

    name: ClassVar[str] = "fuse_hard_swish"
    position: ClassVar[int] = 50
    runs_after: ClassVar[tuple[str, ...]] = ("fuse_activation_chains",)  # matches Clip(0, 6) whole

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if self._opset < HARD_SIGMOID_OPSET:
            return self.result(model)
        for graph in model.graphs():
            # Hard-sigmoid parts first: ``x * (clip(x + 3, 0, 6) / 6)`` then reads as
            # ``x * HardSigmoid(x)`` for the HardSwish sweep.
            for node in list(graph):
                if node.graph is graph and self._hard_sigmoid(node, graph):
                    self.matches += 1
            if self._opset >= HARD_SWISH_OPSET:
                for node in list(graph):
                    if node.graph is graph and self._hard_swish(node, graph):
                        self.matches += 1
        return self.result(model)

    def _relu6_shift(self, value: ir.Value | None, graph: ir.Graph):
        """``(x, [clip, add])`` when ``value = Clip(Add(x, 3), 0, 6)``, else None."""
        clip = _inner(value, graph)
        if clip is None or clip.op_type != "Clip":
            return None
        bounds = clip_range(clip, self._opset)
        if bounds is None or not (bounds[0] == 0.0 and _close(bounds[1], 6.0, bounds[2])):
            return None
        add = _inner(clip.inputs[0], graph)
        if add is None or add.op_type != "Add" or len(add.inputs) != 2:
            return None
        for x, c in (add.inputs, add.inputs[::-1]):
            three = None if x is None else _scalar(c, x)
            if three is not None and _close(three, 3.0, constant_array(c).dtype):
                return x, [clip, add]
        return None

    def _divided_by_six(self, node: ir.Node):
        """The input ``v`` when ``node`` is ``Div(v, 6)`` or ``Mul(v, 1/6)`` (either order)."""
        if not is_standard(node) or len(node.inputs) != 2 or None in node.inputs:
            return None
        if node.op_type == "Div":
            v, c = node.inputs
            k = _scalar(c, v)
            dtype = None if k is None else constant_array(c).dtype
            return v if k is not None and _close(k, 6.0, dtype) else None
        if node.op_type == "Mul":
            for v, c in (node.inputs, node.inputs[::-1]):
                k = _scalar(c, v)
                if k is not None and _close(k, 1.0 / 6.0, constant_array(c).dtype):
                    return v
        return None

    def _emit(self, graph: ir.Graph, anchor: ir.Node, op: str, x: ir.Value, dead, **attrs):
        """Insert ``op(x)`` after ``anchor``, give it ``anchor``'s output, drop ``dead``."""
        out = anchor.outputs[0]
        if x.dtype is not None and x.dtype not in FLOAT_TYPES:
            return False
        node = ir.node(op, [x], attributes=attrs or None, name=f"{anchor.name or op}_fused")
        node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
        graph.insert_after(anchor, node)
        replace_value(out, node.outputs[0])
        graph.remove([anchor, *dead], safe=True)
        logger.debug("fused %s at %s", op, anchor.name)
        return True

    def _hard_sigmoid(self, node: ir.Node, graph: ir.Graph) -> bool:
        v = self._divided_by_six(node)
        match = None if v is None else self._relu6_shift(v, graph)
        if match is None:
            return False
        x, dead = match
        return self._emit(graph, node, "HardSigmoid", x, dead, alpha=ALPHA, beta=BETA)

    def _hard_swish(self, node: ir.Node, graph: ir.Graph) -> bool:
        # x * HardSigmoid(x)
        if node.op_type == "Mul" and is_standard(node) and len(node.inputs) == 2:
            for h in node.inputs:
                hs = _inner(h, graph)
                if hs is None or hs.op_type != "HardSigmoid" or node.inputs[0] is node.inputs[1]:
                    continue
                x = _other(node, h)
                alpha = hs.attributes.get_float("alpha", 0.2)
                beta = hs.attributes.get_float("beta", 0.5)
                if hs.inputs[0] is x and _close(alpha, ALPHA) and _close(beta, BETA):
                    return self._emit(graph, node, "HardSwish", x, [hs])
        # (x * Clip(x + 3, 0, 6)) / 6
        m = self._divided_by_six(node)
        mul = _inner(m, graph)
        if mul is None or mul.op_type != "Mul" or len(mul.inputs) != 2:
            return False
        for c in mul.inputs:
            match = self._relu6_shift(c, graph)
            if match is not None and match[0] is _other(mul, c):
                return self._emit(graph, node, "HardSwish", match[0], [mul, *match[1]])
        return False
