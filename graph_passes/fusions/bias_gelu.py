"""Fold the bias Add in front of a fused GELU into ORT's BiasGelu / FastGelu(bias).

The feed-forward block of a transformer is ``gelu(x @ W + b)``; ORT has kernels that add the
bias inside the activation, saving one pass over the ``[B, S, 4C]`` intermediate::

    before:  t = Add(x, bias)           bias: a true constant of shape [C], C = x's last dim
             y = Gelu(t)                (com.microsoft Gelu, or standard Gelu approximate=none)
             y = FastGelu(t)            (com.microsoft, or standard Gelu approximate=tanh)
    after:   y = com.microsoft.BiasGelu(x, bias)     y = com.microsoft.FastGelu(x, bias)

The math is unchanged: ``y = gelu(x + bias)``. Checks: ``t`` feeds only the GELU and is not
a graph output; ``bias`` is a true constant (not an overridable graph input) of ``x``'s dtype
and shape exactly ``[C]``, so the Add neither broadcasts ``x`` nor changes its shape; the
GELU has its default attributes. Contrib targets only (``portable`` has no such op); the
kernel is probed with ``self.target.supports``. Run after ``fuse_gelu``.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import onnx_ir as ir

from graph_passes.base import constant_tensor
from graph_passes.fusion import Emits, ExpectedRow, Fusion
from graph_passes.match import only_use, probe_node, producer, rewrite
from graph_passes.shapes import infer_shapes
from graph_passes.target.targets import CONTRIB_DOMAIN

logger = logging.getLogger(__name__)


def gelu_form(node: ir.Node) -> str | None:
    """ "none" (erf) / "tanh" for a single-input fused GELU node, else None."""
    if node.domain == CONTRIB_DOMAIN and len(node.inputs) == 1:
        if node.op_type == "Gelu" and not node.attributes:
            return "none"
        if node.op_type == "FastGelu" and not node.attributes:
            return "tanh"
    if node.domain in ("", "ai.onnx") and node.op_type == "Gelu" and len(node.inputs) == 1:
        return node.attributes.get_string("approximate", "none")
    return None


class FuseBiasGelu(Fusion):
    """Add(x, bias) + Gelu/FastGelu -> com.microsoft BiasGelu / FastGelu(x, bias)."""

    name: ClassVar[str] = "fuse_bias_gelu"
    position: ClassVar[int] = 120
    # folds a bias into a Gelu that fuse_gelu made; the attention matchers need the Q/K/V
    # bias Adds this pass would take
    runs_after: ClassVar[tuple[str, ...]] = ("fuse_attention", "fuse_gelu")
    emits: ClassVar[Emits] = Emits(contrib=frozenset({"BiasGelu"}), cuda=frozenset({"BiasGelu"}))
    shadows: ClassVar[tuple[str, ...]] = ("BiasGeluFusion",)
    expected: ClassVar[ExpectedRow] = ExpectedRow("gelu", frozenset({"BiasGelu"}))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.declined = 0  # matched, but the fused kernel is measured slower on the target
        if not self.target.allows_contrib:
            return self.result(model)
        infer_shapes(model)
        for graph in model.graphs():
            for node in list(graph):
                form = gelu_form(node)
                if form not in ("none", "tanh"):
                    continue
                add = producer(node.inputs[0], "Add")
                operands = None if add is None else self._operands(add, node)
                if operands is None:
                    continue
                op = "BiasGelu" if form == "none" else "FastGelu"
                probe = probe_node(CONTRIB_DOMAIN, op, operands)
                if not self.can_emit(probe):
                    logger.debug("%s: no %s kernel for this target", node.name, op)
                    continue
                if not self.rewrite_pays(
                    [add, node], [node.outputs[0]], [probe], [probe.outputs[0]]
                ):
                    self.declined += 1
                    continue
                fused = ir.Node(CONTRIB_DOMAIN, op, operands, name=node.name)
                if rewrite(graph, node, [add, node], fused):
                    model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
                    self.matches += 1
        return self.result(model)

    def _operands(self, add: ir.Node, gelu: ir.Node) -> list[ir.Value] | None:
        """``[x, bias]`` of the Add when it can be folded, else None (reason logged)."""
        if add.graph is not gelu.graph or only_use(add.outputs[0]) is not gelu:
            logger.debug("%s: the bias Add has other uses", gelu.name)
            return None
        for x, bias in (add.inputs, add.inputs[::-1]):
            tensor = constant_tensor(bias)
            if x is None or tensor is None or x.shape is None or len(x.shape) == 0:
                continue
            hidden = x.shape[-1]
            if (
                isinstance(hidden, int)
                and tuple(tensor.shape) == (hidden,)
                and tensor.dtype == x.dtype
                and constant_tensor(x) is None
            ):
                return [x, bias]
        logger.debug("%s: bias is not a constant [C] matching x's last dim", gelu.name)
        return None
