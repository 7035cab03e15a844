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

import onnx_ir as ir

from graph_passes.base import (
    can_replace,
    replace_value,
)
from graph_passes.fusion import Emits, ExpectedRow, Fusion
from graph_passes.fusions._layer_norm_match import LayerNormMatcher
from graph_passes.shapes import infer_shapes

logger = logging.getLogger(__name__)

LAYER_NORM_OPSET = 17


class FuseLayerNorm(Fusion):
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul[/Add] -> LayerNormalization."""

    name: ClassVar[str] = "fuse_layer_norm"
    position: ClassVar[int] = 60
    runs_after: ClassVar[tuple[str, ...]] = ("raise_opset",)
    emits: ClassVar[Emits] = Emits(standard={"LayerNormalization": LAYER_NORM_OPSET})
    expected: ClassVar[ExpectedRow] = ExpectedRow("layernorm", frozenset({"LayerNormalization"}))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.blocked = 0  # patterns matched but left because the model's opset is below 17
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        infer_shapes(model)
        matcher = LayerNormMatcher(self._opset)
        claimed: set[ir.Node] = set()  # nodes of a pattern already matched (fused or blocked)
        for graph in model.graphs():
            for root in reversed(list(graph)):  # last node first: Add(beta) before its Mul
                if root in claimed:
                    continue
                match = matcher.match(root)
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
