"""Merge consecutive Relu and Clip nodes into one node with the intersected range.

Exporters leave ``Relu -> Clip(0, 6)`` (a ReLU6 written as ``clamp(relu(x), max=6)``),
``Clip -> Clip`` (a clamp after a Hardtanh) and ``Relu -> Relu`` (a block that ends and the
next that starts with an activation); each is a full pass over the activation for nothing::

    before:  m = Relu(x);            y = Clip(m, 0, 6)
    after:   y = Clip(x, 0, 6)

    before:  m = Clip(x, a1, b1);    y = Clip(m, a2, b2)
    after:   y = Clip(x, max(a1, a2), min(b1, b2))

Relu is ``Clip(x, 0, +inf)``. With ``lo = max(a1, a2)`` and ``hi = min(b1, b2)``,
``clip(clip(x, a1, b1), a2, b2) == clip(x, lo, hi)`` for every x whenever ``lo <= hi`` (the
ranges intersect); otherwise the result is a constant and the chain is left alone. The merged
node is a Relu when the range is exactly ``[0, +inf)``, else a Clip (so ``Clip(0, 6)`` stays a
Clip, which ORT fuses into the Conv before it). Clip's bounds are attributes before opset 11
(``min``/``max``, floats) and optional inputs from opset 11; an input bound must be a true
constant scalar, and new bounds are written as fresh scalar initializers of the data's dtype
(an infinite bound is simply left out). Only fires when the first node's output has the second
as its only use and is not a graph output; the second node's output keeps its name.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import (
    replace_value,
)
from graph_passes.fusion import Fusion
from graph_passes.match import CLIP_INPUTS_OPSET, INF, all_names, clip_range, new_initializer

logger = logging.getLogger(__name__)


class FuseActivationChains(Fusion):
    """Merge ``Relu/Clip -> Relu/Clip`` into one Relu or Clip with the intersected range."""

    name: ClassVar[str] = "fuse_activation_chains"
    position: ClassVar[int] = 40

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        names = all_names(model)
        for graph in model.graphs():
            changed = True
            while changed:  # a merged node may merge again with the next one
                changed = False
                for node in list(graph):
                    if node.graph is graph and self._merge(node, graph, names):
                        self.matches += 1
                        changed = True
        return self.result(model)

    def _merge(self, second: ir.Node, graph: ir.Graph, names: set[str]) -> bool:
        outer = clip_range(second, self._opset)
        if outer is None or not second.inputs or second.inputs[0] is None:
            return False
        mid = second.inputs[0]
        if mid.is_graph_output() or len(mid.uses()) != 1:
            return False
        first = mid.producer()
        if first is None or first.graph is not graph:
            return False
        inner = clip_range(first, self._opset)
        x = first.inputs[0] if first.inputs else None
        if inner is None or x is None:
            return False
        lo, hi = max(inner[0], outer[0]), min(inner[1], outer[1])
        if lo > hi:
            logger.debug("%s -> %s: ranges do not intersect", first.name, second.name)
            return False
        out = second.outputs[0]
        node = self._make(x, lo, hi, inner[2] or outer[2], graph, names, second)
        if node is None:
            return False
        node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
        graph.insert_after(second, node)  # a fresh node's output can always take out's place
        replace_value(out, node.outputs[0])
        graph.remove([second, first], safe=True)
        logger.debug("merged %s and %s into %s", first.name, second.name, node.op_type)
        return True

    def _make(
        self,
        x: ir.Value,
        lo: float,
        hi: float,
        bound_dtype: np.dtype | None,
        graph: ir.Graph,
        names: set[str],
        second: ir.Node,
    ) -> ir.Node | None:
        name = f"{second.name or second.op_type}_merged"
        if lo == 0.0 and hi == INF:
            return ir.node("Relu", [x], name=name, version=second.version)
        if (second.version or self._opset) < CLIP_INPUTS_OPSET:
            attrs: dict[str, float] = {}
            if lo != -INF:
                attrs["min"] = float(lo)
            if hi != INF:
                attrs["max"] = float(hi)
            return ir.node("Clip", [x], attributes=attrs, name=name, version=second.version)
        dtype = bound_dtype
        if dtype is None and x.dtype is not None:
            dtype = x.dtype.numpy()
        if dtype is None:
            return None
        inputs: list[ir.Value | None] = [x, None, None]
        for i, bound in ((1, lo), (2, hi)):
            if abs(bound) != INF:
                array = np.array(bound, dtype=dtype)
                inputs[i] = new_initializer(graph, names, f"{name}_{('min', 'max')[i - 1]}", array)
        while inputs[-1] is None:
            inputs.pop()
        return ir.node("Clip", inputs, name=name, version=second.version)
