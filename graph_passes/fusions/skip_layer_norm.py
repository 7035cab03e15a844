"""Fuse a residual Add and the LayerNorm after it into com.microsoft SkipLayerNormalization.

Every transformer block ends ``LayerNorm(residual + sublayer(residual))``; ONNX Runtime has one
kernel for the sum and the normalization::

    before:  s = Add(a, b)                  [optionally a = Add(m, bias), bias a [C] constant]
             z = LayerNormalization<axis=-1, epsilon=eps>(s, gamma, beta)
             (s may also feed later nodes: the residual of the next block)
    after:   z, _, _, s = SkipLayerNormalization<epsilon=eps>(a, b, gamma, beta[, bias])

``z = (s - mean(s)) / sqrt(var(s) + eps) * gamma + beta`` with ``s = input + skip + bias``;
the 4th output (``input_skip_bias_sum``) is ``s`` itself, so a sum that is used elsewhere is
taken from there instead of refusing the match.

The LayerNorm is the standard op or its decomposed form (``fuse_layer_norm``'s matcher):
torch's legacy exporter below opset 17 has no LayerNormalization, and this is how those
exports still get one fused kernel per block.

Shape rules are ORT's CPU kernel's (probed with ORT 1.31): input rank 2 or 3 and exactly the
shape of the sum (a batch-1 input with a batch-2 skip gives a batch-1 output, silently);
skip the same shape, or ``[1, S, C]`` / ``[S, C]`` for a rank-3 input; gamma, beta and bias
of shape ``[C]``. Shapes are compared symbolically, so unknown dims refuse the match.
Contrib only: on ``portable`` nothing is fused. A lone LayerNorm below opset 17 stays
decomposed: ORT runs ``LayerNormalization`` at any opset, but the ONNX checker rejects it
below 17 and there is no com.microsoft LayerNormalization (probed).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import onnx_ir as ir

from graph_passes.fusion import Emits, ExpectedRow, Fusion
from graph_passes.fusions._layer_norm_match import LayerNormMatcher
from graph_passes.fusions._residual_norm import ResidualNormFuser
from graph_passes.match import (
    is_op,
    opset_of,
)
from graph_passes.shapes import infer_shapes
from graph_passes.target.targets import Target

logger = logging.getLogger(__name__)


class FuseSkipLayerNorm(Fusion):
    """Add (+ bias Add) + LayerNorm (standard or decomposed) -> SkipLayerNormalization."""

    name: ClassVar[str] = "fuse_skip_layer_norm"
    position: ClassVar[int] = 90
    # The attention matchers need the residual Add/LayerNorm this pass would take.
    runs_after: ClassVar[tuple[str, ...]] = (
        "fuse_attention",
        "fuse_decoder_attention",
        "fuse_embed_layer_norm",
    )
    emits: ClassVar[Emits] = Emits(
        contrib=frozenset({"SkipLayerNormalization"}),
        cuda=frozenset({"SkipLayerNormalization"}),
    )
    shadows: ClassVar[tuple[str, ...]] = ("SkipLayerNormFusion",)
    expected: ClassVar[ExpectedRow] = ExpectedRow(
        "layernorm", frozenset({"SkipLayerNormalization"})
    )

    def __init__(self, target: Target | None = None) -> None:
        super().__init__(target)
        self.blocked = 0  # matched, but the target has no kernel for the fused node
        self.declined = 0  # matched, but the fused kernel is measured slower on the target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.blocked = self.declined = 0
        if not self.target.allows_contrib:
            return self.result(model)
        opset = opset_of(model)
        infer_shapes(model, refresh=True)
        fuser = ResidualNormFuser(self, model)  # new per call: the model has changed
        matcher = LayerNormMatcher(opset)
        claimed: set[ir.Node] = set()
        for graph in model.graphs():
            fused_here = 0
            for root in reversed(list(graph)):
                if root.graph is not graph or root in claimed:
                    continue
                layer_norm = self._layer_norm(root, matcher, fuser)
                if layer_norm is None:
                    continue
                claimed.update(layer_norm[-1])
                fused_here += fuser.fuse(graph, root, *layer_norm)
            if fused_here:
                graph.sort()  # the sum output may feed nodes placed before the LayerNorm
            self.matches += fused_here
        self.blocked, self.declined = fuser.blocked, fuser.declined
        return self.result(model)

    def _layer_norm(
        self, root: ir.Node, matcher: LayerNormMatcher, fuser: ResidualNormFuser
    ) -> tuple | None:
        """``(s, gamma, beta, eps, nodes)`` of a LayerNorm over the last axis ending at root."""
        if not is_op(root, "LayerNormalization"):
            return matcher.match(root)
        s = root.inputs[0]
        rank = None if s is None or s.shape is None else len(s.shape)
        if rank is None and s is not None:  # e.g. behind a contrib op ONNX cannot infer
            known = fuser.symbolic_table(root.graph).get(s.name or "")
            rank = None if known is None else len(known)
        axis = root.attributes.get_int("axis", -1)
        extra = [o for o in root.outputs[1:] if o.uses() or o.is_graph_output()]
        if rank is None or axis not in (-1, rank - 1) or extra:
            return None
        if root.attributes.get_int("stash_type", 1) != 1:
            return None
        gamma = root.inputs[1]
        beta = root.inputs[2] if len(root.inputs) > 2 else None
        eps = root.attributes.get_float("epsilon", 1e-5)
        return s, gamma, beta, eps, [root]
