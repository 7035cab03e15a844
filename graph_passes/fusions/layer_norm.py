"""Fuse the decomposed LayerNorm that exporters emit into one ``LayerNormalization`` node.

torch's legacy exporter below opset 17 (and many hand-written models) spell LayerNorm out
over the last axis. The chain is rewritten when every intermediate is private to it::

    before:  mean = ReduceMean<keepdims=1>(x, axes=[-1])    d   = Sub(x, mean)
             sq   = Pow(d, 2)  (or Mul(d, d))               var = ReduceMean<keepdims=1>(sq, [-1])
             std  = Sqrt(Add(var, eps))                     n   = Div(d, std)
             y    = Mul(n, gamma)                           z   = Add(y, beta)
    after:   z = LayerNormalization<axis=-1, epsilon=eps>(x, gamma, beta)

The math is the definition of LayerNormalization over the last axis::

    z = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta

Accepted variants: ``Mul(d, Reciprocal(std))`` for the Div, no final Add (LayerNormalization
without bias), either operand order of the commutative Mul/Add, ReduceMean axes as an
attribute (opset < 18) or a constant input (opset 18+), axes ``[-1]`` or ``[rank - 1]``.
Checks: eps is a constant of one element; gamma and beta are true constants of shape
``[C]`` (C equal to the last dim of ``x`` when known, and never 1 when unknown, where the
original would broadcast) in ``x``'s dtype (float, float16 or bfloat16); ``Pow``'s exponent
is the constant 2; ``d`` feeds only the square and the Div, every other intermediate has
one use, and none is a graph output. ``LayerNormalization`` exists from opset 17 only:
below that, matches are counted in ``blocked`` and left as they are.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import (
    GraphPass,
    can_replace,
    constant_array,
    constant_tensor,
    is_standard,
    outside_use,
    reduces_last_axis,
    replace_value,
)
from graph_passes.shapes import infer_shapes

logger = logging.getLogger(__name__)

LAYER_NORM_OPSET = 17
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


class FuseLayerNorm(GraphPass):
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul[/Add] -> LayerNormalization."""

    name: ClassVar[str] = "fuse_layer_norm"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.blocked = 0  # patterns matched but left because the model's opset is below 17
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        infer_shapes(model)
        claimed: set[ir.Node] = set()  # nodes of a pattern already matched (fused or blocked)
        for graph in model.graphs():
            for root in reversed(list(graph)):  # last node first: Add(beta) before its Mul
                if root in claimed:
                    continue
                match = self._match(root)
                if match is None:
                    continue
                claimed.update(match[-1])
                if self._opset < LAYER_NORM_OPSET:
                    self.blocked += 1
                    continue
                self._rewrite(graph, root, *match)
        if self.blocked:
            logger.info("%d LayerNorm patterns need opset >= 17; left as-is", self.blocked)
        return self.result(model)

    def match(self, root: ir.Node, opset: int) -> tuple | None:
        """The decomposed LayerNorm ending at ``root`` in a model of default-domain ``opset``:
        ``(x, gamma, beta, eps, nodes)`` or None. For passes that fuse more around it
        (fuse_skip_layer_norm); shapes must have been inferred."""
        self._opset = opset
        return self._match(root)

    def _match(self, root: ir.Node) -> tuple | None:
        """``(x, gamma, beta, eps, nodes)`` of the pattern ending at ``root``, else None."""
        beta = None
        scale = root
        if _is(root, "Add"):
            scale, beta = _split(root, "Mul")
            if scale is None:
                return None
        if not _is(scale, "Mul"):
            return None
        norm, gamma = _split(scale, "Div", "Mul")
        if norm is None:
            return None
        if _is(norm, "Div"):
            d, std = norm.inputs
            recip = None
        else:
            recip, d = _split(norm, "Reciprocal", allow_constant=False)
            std = None if recip is None else recip.inputs[0]
        sqrt, sub = _producer(std, "Sqrt"), _producer(d, "Sub")
        if sqrt is None or sub is None:
            return None
        add_eps = _producer(sqrt.inputs[0], "Add")
        var_mean, eps = _split(add_eps, "ReduceMean")
        if var_mean is None:
            return None
        square = _producer(var_mean.inputs[0], "Pow", "Mul")
        x, mean = sub.inputs
        mean_node = _producer(mean, "ReduceMean")
        if square is None or mean_node is None or mean_node.inputs[0] is not x or x is None:
            return None
        if square.inputs[0] is not d or not self._is_square(square):
            return None
        nodes = [mean_node, sub, square, var_mean, add_eps, sqrt, recip, norm, scale]
        nodes = [n for n in nodes if n is not None] + ([root] if beta is not None else [])
        if not self._checks(x, gamma, beta, eps, mean_node, var_mean, nodes, root):
            return None
        return x, gamma, beta, float(constant_array(eps).reshape(-1)[0]), nodes

    def _is_square(self, node: ir.Node) -> bool:
        if node.op_type == "Mul":
            return node.inputs[1] is node.inputs[0]
        exponent = constant_array(node.inputs[1])
        return (
            exponent is not None
            and exponent.size == 1
            and exponent.ndim <= 1
            and (float(exponent.reshape(-1)[0]) == 2.0)
        )

    def _checks(self, x, gamma, beta, eps, mean_node, var_mean, nodes, root) -> bool:
        """Constants, dtypes, axes and private intermediates; logs why a match is rejected."""
        reason = None
        dtype = x.dtype
        eps_array = constant_array(eps)
        last = x.shape[-1] if x.shape is not None and len(x.shape) > 0 else None
        rank = None if x.shape is None else len(x.shape)
        if dtype not in FLOAT_TYPES:
            reason = f"x dtype {dtype} is not float/float16/bfloat16"
        elif eps_array is None or eps_array.size != 1 or eps_array.ndim > 1:
            reason = "eps is not a one-element constant"
        elif not np.isfinite(eps_array).all():
            reason = "eps is not finite"
        elif not all(reduces_last_axis(n, rank, self._opset) for n in (mean_node, var_mean)):
            reason = "ReduceMean is not over the last axis alone with keepdims=1"
        elif not all(self._param_ok(p, dtype, last) for p in (gamma, beta) if p is not None):
            reason = "gamma/beta are not constants of shape [C] matching x"
        elif any(n.graph is not root.graph or not is_standard(n) for n in nodes):
            reason = "nodes span graphs or domains"
        else:
            reason = outside_use(nodes)
        if reason is not None:
            logger.debug("LayerNorm at %s not fused: %s", root.name, reason)
        return reason is None

    def _param_ok(self, value: ir.Value, dtype: ir.DataType, last) -> bool:
        tensor = constant_tensor(value)
        if tensor is None or len(tensor.shape) != 1 or tensor.dtype != dtype:
            return False
        return tensor.shape[0] == last if isinstance(last, int) else tensor.shape[0] > 1

    def _rewrite(self, graph, root, x, gamma, beta, eps, nodes) -> None:
        z = root.outputs[0]
        inputs = [x, gamma] if beta is None else [x, gamma, beta]
        attrs = [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", eps)]
        node = ir.Node("", "LayerNormalization", inputs, attrs, num_outputs=1, name=root.name)
        out = node.outputs[0]
        out.type, out.shape = z.type, z.shape
        graph.insert_before(root, node)
        if not can_replace(z, out):  # cannot happen for a fresh node output; kept for safety
            graph.remove(node)
            return
        name = z.name
        replace_value(z, out)
        graph.remove(nodes, safe=True)
        out.name = name
        self.matches += 1
        logger.debug("fused LayerNorm into %s (eps=%g)", out.name, eps)


def _is(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.op_type in ops and is_standard(node)


def _producer(value: ir.Value | None, *ops: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if _is(node, *ops) else None


def _split(node: ir.Node | None, *ops: str, allow_constant: bool = True):
    """For a binary ``node``: (the input's producer of one of ``ops``, the other input).

    The other input must be a true constant unless ``allow_constant`` is False, in which case
    it is returned as is. ``(None, None)`` when neither order fits.
    """
    if node is None or len(node.inputs) != 2:
        return None, None
    for a, b in (node.inputs, node.inputs[::-1]):
        producer = _producer(a, *ops)
        if producer is not None and (not allow_constant or constant_array(b) is not None):
            return producer, b
    return None, None
