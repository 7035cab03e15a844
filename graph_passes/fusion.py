"""What a fusion is: a graph pass that carries its own facts.

Everything the rest of the pipeline needs to know about a fusion is declared on its class, so
adding one is one file (plus its test and docs row), not edits to side tables:

- ``emits``: the fused ops it may write: ``com.microsoft`` ops (and which of those ORT's CUDA
  provider has kernels for) and standard ops with the opset each first exists in. The target
  check (``can_emit``) reads it.
- ``shadows``: ORT's own graph transformers that build the same contrib ops. Kernel timing
  turns them off on the unfused side, so the fused kernel is timed against the nodes it
  replaces as they really run, not against ORT fusing them itself in a tiny cut-out model.
- ``position`` and ``in_default``: where it runs in the default recipe (the ``"fusions"``
  entry of a recipe expands to every fusion with ``in_default``, by ``position``);
  ``runs_after`` (on every pass) states the orders that matter for correctness.
- ``expected``: the row of the expected-fusion report it counts towards and the fused ops
  that count as achieved there (pipeline/fusion_report.py).

The registry finds fusions by scanning ``graph_passes/fusions`` (graph_passes/registry.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir

from graph_passes.base import STANDARD_DOMAINS, GraphPass
from graph_passes.target.kernel_timing import KernelCheck


@dataclass(frozen=True)
class Emits:
    """The fused ops a fusion may write."""

    contrib: frozenset[str] = frozenset()  # com.microsoft ops (cpu and cuda targets)
    # Those of ``contrib`` that ORT's CUDA provider registers (onnxruntime/contrib_ops/cuda,
    # ORT 1.31): a CUDA kernel cannot be probed without a GPU, so it is declared.
    cuda: frozenset[str] = frozenset()
    # standard op -> the opset it first exists in (LayerNormalization 17, Gelu 20, ...)
    standard: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpectedRow:
    """The expected-fusion report row a fusion counts towards."""

    row: str  # "attention", "layernorm", "gelu", ...
    fused_ops: frozenset[str]  # ops in the optimized model that count as achieved


class Fusion(GraphPass):
    """A pattern rewrite into fewer, fused ops; subclasses declare the facts above."""

    emits: ClassVar[Emits] = Emits()
    shadows: ClassVar[tuple[str, ...]] = ()
    position: ClassVar[int] = 0
    in_default: ClassVar[bool] = True
    expected: ClassVar[ExpectedRow | None] = None

    def can_emit(self, node: ir.Node) -> bool:
        """Whether the target runs ``node``, a node this fusion is about to write.

        A standard node is accepted (``can_emit_standard`` checks its opset); a contrib node
        needs a CPU kernel (probed, the verifier runs on CPU) and, for ``cuda``, to be one of
        ``emits.cuda``.
        """
        if node.domain in STANDARD_DOMAINS:
            return True
        if self.target.name == "cuda" and node.op_type not in self.emits.cuda:
            return False
        return self.target.supports(node)

    def can_emit_standard(self, op_type: str, model_opset: int) -> bool:
        """Whether the standard ``op_type`` exists at the model's default-domain opset."""
        return model_opset >= self.emits.standard[op_type]

    def rewrite_pays(self, *rewrite) -> bool:
        """``Target.rewrite_pays(before, before_outputs, after, after_outputs[, shapes])``
        with this fusion's shadowed ORT transformers off on the unfused side."""
        return self.target.rewrite_pays(*rewrite, shadows=self.shadows)

    def measure_rewrite(self, *rewrite) -> KernelCheck | None:
        """``Target.measure_rewrite`` (same arguments) with this fusion's ``shadows``."""
        return self.target.measure_rewrite(*rewrite, shadows=self.shadows)
