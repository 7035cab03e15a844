"""Fuse the decomposed RMSNorm (Llama, T5, Mistral...) into one normalization node.

::

    before:  sq = Pow(x, 2)  (or Mul(x, x))     v  = ReduceMean<keepdims=1>(sq, axes=[-1])
             s  = Sqrt(Add(v, eps))             n  = Mul(x, Reciprocal(s))
                                                     (or Div(x, s), or Mul(x, Div(1, s)))
             y  = Mul(gamma, n)
    after:   y = RMSNormalization<axis=-1, epsilon=eps>(x, gamma)                (opset >= 23)
       or    y, _, _, r = com.microsoft.SkipSimplifiedLayerNormalization(a, b, gamma[, bias])
             when x = Add(a, b) is a residual sum (r replaces x for its other uses)

The math: ``y = x / sqrt(mean(x^2) + eps) * gamma``, the definition of RMSNormalization over
the last axis.

What exists where (probed with ORT 1.31 and onnx 1.23): ``RMSNormalization`` is standard
from opset 23 and ORT's CPU provider runs it. Below 23, ORT registers
``SimplifiedLayerNormalization`` in the *default* domain (at any opset) and not in
com.microsoft; the ONNX checker rejects it ("No Op registered ... with domain_version of
17"), so this pass never emits it: a model we hand back must pass the checker.
``com.microsoft.SkipSimplifiedLayerNormalization`` exists, runs on CPU and passes the checker,
so on contrib targets an RMSNorm fed by a residual Add becomes that (every RMSNorm of a
decoder block except the very first is). Other matches below opset 23 are counted in
``blocked`` and left alone (``raise_opset`` to 23 makes them fusable).

Checks: eps a finite one-element constant, exponent exactly 2, ReduceMean over the last axis
alone with keepdims=1, gamma a true constant of shape ``[C]`` in x's dtype, every
intermediate private to the pattern.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import (
    constant_array,
    constant_tensor,
    outside_use,
    reduces_last_axis,
)
from graph_passes.fusion import Emits, ExpectedRow, Fusion
from graph_passes.fusions._residual_norm import ResidualNormFuser
from graph_passes.match import FLOAT_TYPES, is_op, is_scalar_const, opset_of, producer, rewrite
from graph_passes.shapes import infer_shapes

logger = logging.getLogger(__name__)


class FuseRMSNorm(Fusion):
    """Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul -> RMSNormalization or SkipSimplifiedLN."""

    name: ClassVar[str] = "fuse_rms_norm"
    position: ClassVar[int] = 100
    emits: ClassVar[Emits] = Emits(
        contrib=frozenset({"SkipSimplifiedLayerNormalization"}),
        cuda=frozenset({"SkipSimplifiedLayerNormalization"}),
        standard={"RMSNormalization": 23},
    )
    shadows: ClassVar[tuple[str, ...]] = ("SimplifiedLayerNormFusion", "SkipLayerNormFusion")
    expected: ClassVar[ExpectedRow] = ExpectedRow(
        "rmsnorm",
        frozenset(
            {"RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
        ),
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.blocked = 0
        self._opset = opset_of(model)
        infer_shapes(model)
        residual = ResidualNormFuser(self, model)
        claimed: set[ir.Node] = set()
        for graph in model.graphs():
            fused_here = 0
            for root in reversed(list(graph)):
                if root.graph is not graph or root in claimed:
                    continue
                match = self.match(root)
                if match is None:
                    continue
                x, gamma, eps, nodes = match
                claimed.update(nodes)
                if self.target.allows_contrib and residual.fuse(
                    graph, root, x, gamma, None, eps, nodes, simplified=True
                ):
                    fused_here += 1
                elif self.can_emit_standard("RMSNormalization", self._opset):
                    attrs = [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", eps)]
                    node = ir.Node("", "RMSNormalization", [x, gamma], attrs, name=root.name)
                    fused_here += rewrite(graph, root, nodes, node)
                else:
                    self.blocked += 1
            if fused_here:
                graph.sort()
            self.matches += fused_here
        if self.blocked:
            logger.info("%d RMSNorm patterns need opset >= 23 or a residual Add", self.blocked)
        return self.result(model)

    def match(self, root: ir.Node) -> tuple | None:
        """``(x, gamma, eps, nodes)`` of the RMSNorm ending at ``root`` (a Mul), else None."""
        if not is_op(root, "Mul"):
            return None
        for n_value, gamma in (root.inputs, root.inputs[::-1]):
            norm = producer(n_value, "Mul", "Div")
            found = None if norm is None else self._norm(norm)
            if found is None:
                continue
            x, inner, eps = found
            nodes = [*inner, norm, root]
            if self._checks(x, gamma, eps, nodes, root):
                return x, gamma, float(constant_array(eps).reshape(-1)[0]), nodes
        return None

    def _norm(self, norm: ir.Node) -> tuple | None:
        """``(x, [square, mean, add_eps, sqrt, (reciprocal)], eps)`` of ``x / sqrt(...)``."""
        if norm.op_type == "Div":
            x, std = norm.inputs
            recip = None
        else:
            recip = x = None
            for a, b in (norm.inputs, norm.inputs[::-1]):
                r = producer(b, "Reciprocal", "Div")
                one = r is not None and r.op_type == "Div" and is_scalar_const(r.inputs[0], 1.0)
                if r is not None and (r.op_type == "Reciprocal" or one):
                    recip, x = r, a
                    break
            std = None if recip is None else recip.inputs[-1]
        sqrt = producer(std, "Sqrt")
        add_eps = producer(None if sqrt is None else sqrt.inputs[0], "Add")
        if add_eps is None or x is None:
            return None
        for v, eps in (add_eps.inputs, add_eps.inputs[::-1]):
            mean = producer(v, "ReduceMean")
            square = producer(None if mean is None else mean.inputs[0], "Pow", "Mul")
            if square is None or square.inputs[0] is not x or constant_array(eps) is None:
                continue
            if square.op_type == "Mul" and square.inputs[1] is not x:
                continue
            if square.op_type == "Pow" and not is_scalar_const(square.inputs[1], 2.0, rtol=0.0):
                continue
            inner = [square, mean, add_eps, sqrt] + ([recip] if recip is not None else [])
            return x, inner, eps
        return None

    def _checks(self, x, gamma, eps, nodes: list[ir.Node], root: ir.Node) -> bool:
        """Constants, dtypes, axes and private intermediates; logs why a match is rejected."""
        reason = None
        mean = nodes[1]
        eps_array = constant_array(eps)
        tensor = constant_tensor(gamma)
        last = x.shape[-1] if x.shape is not None and len(x.shape) > 0 else None
        if x.dtype not in FLOAT_TYPES:
            reason = f"x dtype {x.dtype} is not float/float16/bfloat16"
        elif eps_array is None or eps_array.size != 1 or eps_array.ndim > 1:
            reason = "eps is not a one-element constant"
        elif not np.isfinite(eps_array).all() or float(eps_array.reshape(-1)[0]) < 0:
            reason = "eps is not finite and >= 0"
        elif not reduces_last_axis(mean, None if x.shape is None else len(x.shape), self._opset):
            reason = "ReduceMean is not over the last axis alone with keepdims=1"
        elif tensor is None or tensor.dtype != x.dtype or not isinstance(last, int):
            reason = "gamma is not a constant in x's dtype, or x's last dim is unknown"
        elif tuple(tensor.shape) != (last,):
            reason = f"gamma shape {tuple(tensor.shape)} is not [{last}]"
        elif any(n.graph is not root.graph for n in nodes):
            reason = "nodes span graphs"
        elif _is_centered(x):
            reason = "x is x0 - mean(x0): a LayerNorm, left to the LayerNorm fusions"
        else:
            reason = outside_use(nodes)
        if reason is not None:
            logger.debug("RMSNorm at %s not fused: %s", root.name, reason)
        return reason is None


def _is_centered(x: ir.Value) -> bool:
    """``x = Sub(x0, ReduceMean(x0))``: then the "RMSNorm" is the tail of a LayerNorm."""
    sub = producer(x, "Sub")
    mean = None if sub is None else producer(sub.inputs[1], "ReduceMean")
    return mean is not None and mean.inputs[0] is sub.inputs[0]
