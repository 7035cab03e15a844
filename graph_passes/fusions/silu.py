"""Fuse SiLU (Swish), ``x * sigmoid(x)``, into ORT's one-kernel ``QuickGelu`` with alpha 1.

The MLP of Llama, Mistral, Qwen and SmolLM is ``down(silu(gate(x)) * up(x))``; exporters
write the activation as two ops (torch's ``F.silu`` decomposes into them)::

    before:  s = Sigmoid(x)
             y = Mul(x, s)          (either operand order)
    after:   y = com.microsoft.QuickGelu<alpha=1.0>(x)

``QuickGelu(x) = x * sigmoid(alpha * x)``, so alpha 1 is SiLU exactly. Checks: ``s`` feeds
only the Mul and is not a graph output (the rewriter refuses otherwise); the target has a
kernel for QuickGelu at x's dtype (probed on CPU; on ``cuda`` it is declared below); and on a
timed ``cpu`` target the fused kernel is not slower than the two ops it replaces. Contrib
targets only: the standard ``Swish`` op arrives in opset 24, above what ORT 1.31 runs.

Written with onnxscript's rewriter (pattern / check / rewrite) behind the Fusion interface:
the pattern is two ops, commutation is the rewriter's, and the check is where the target
and kernel timing have their say.
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir
from onnxscript.rewriter import pattern

from graph_passes.fusion import Emits, Fusion
from graph_passes.match import probe_node
from graph_passes.target.targets import CONTRIB_DOMAIN

ALPHA = ir.AttrFloat32("alpha", 1.0)


class FuseSilu(Fusion):
    """Mul(x, Sigmoid(x)) -> com.microsoft QuickGelu(x, alpha=1)."""

    name: ClassVar[str] = "fuse_silu"
    position: ClassVar[int] = 115
    emits: ClassVar[Emits] = Emits(contrib=frozenset({"QuickGelu"}), cuda=frozenset({"QuickGelu"}))
    shadows: ClassVar[tuple[str, ...]] = ("QuickGeluFusion",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.declined = 0  # matched, but the fused kernel is measured slower on the target
        if self.target.allows_contrib:
            rule = pattern.RewriteRule(self._pattern, self._rewrite, self._check, name=self.name)
            rules = pattern.RewriteRuleSet([rule], commute=True)
            self.matches = rules.apply_to_model(model)
        return self.result(model)

    @staticmethod
    def _pattern(op, x):
        return op.Mul(x, op.Sigmoid(x))

    def _check(self, context, x: ir.Value) -> pattern.MatchResult:
        result = pattern.MatchResult()
        probe = probe_node(CONTRIB_DOMAIN, "QuickGelu", [x], [ALPHA])
        if not self.can_emit(probe):
            return result.fail(f"target {self.target.name} has no QuickGelu for {x.dtype}")
        root = context.root
        if not self.rewrite_pays(context.nodes, [root.outputs[0]], [probe], probe.outputs):
            self.declined += 1
            return result.fail("QuickGelu measured slower than Sigmoid + Mul here")
        return result

    @staticmethod
    def _rewrite(op, x):
        return op.QuickGelu(x, alpha=1.0, _domain=CONTRIB_DOMAIN)
