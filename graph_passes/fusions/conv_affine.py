"""Fold a constant per-channel Add or Mul after a Conv (or ConvTranspose) into its weights.

Exporters turn ``conv(x) * scale + shift`` (frozen BN written by hand, channel attention with
constant weights, input normalisation moved after the first layer) into separate nodes::

    before:  c = Conv(x, W, B);   y = Add(c, t)       t: [C, 1, 1] or [1, C, 1, 1]
    after:   y = Conv(x, W, B + t)

    before:  c = Conv(x, W, B);   y = Mul(c, s)       s: [C, 1, 1] or [1, C, 1, 1]
    after:   y = Conv(x, W * s, B * s)                (W scaled along its output-channel axis)

The constant is right-aligned against the Conv's output ``[N, C, spatial...]`` (numpy
broadcasting), and must then be 1 on every axis except the channel axis, where it is C or 1,
and must not have more axes than the output (that would change the output's shape). So a
``[C]`` constant on a 2-D Conv broadcasts along the WIDTH, not the channels, and is left
alone, as is a full-spatial ``[C, H, W]`` one. Its dtype must be the weight's dtype. Only
fires when the Conv's output has that single use and is not a graph output, and the weight
and bias are true constants (see ``fuse_conv_bn``, which this shares its rewrite with).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import can_replace, constant_array, is_standard, replace_value
from graph_passes.fusion import Fusion
from graph_passes.fusions._channel_affine import single_use_producer
from graph_passes.match import all_names

logger = logging.getLogger(__name__)


def _per_channel(const: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``const`` as a ``[channels]`` vector when it broadcasts per channel on a rank-``rank``
    ``[N, C, ...]`` tensor without changing its shape, else None."""
    if const.ndim > rank:
        return None
    shape = (1,) * (rank - const.ndim) + const.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(const.reshape(-1).astype(np.float64), (channels,))


class FuseConvAffine(Fusion):
    """Fold ``Conv -> Add(per-channel constant)`` and ``Conv -> Mul(per-channel constant)``."""

    name: ClassVar[str] = "fuse_conv_affine"
    position: ClassVar[int] = 20

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        names = all_names(model)
        for graph in model.graphs():
            for node in list(graph):
                if node.op_type not in ("Add", "Mul") or not is_standard(node):
                    continue
                if len(node.inputs) != 2 or any(v is None for v in node.inputs):
                    continue
                for i in (0, 1):
                    if self._fold(node, node.inputs[i], node.inputs[1 - i], graph, names):
                        self.matches += 1
                        break
        return self.result(model)

    def _fold(
        self, node: ir.Node, mid: ir.Value, other: ir.Value, graph: ir.Graph, names: set[str]
    ) -> bool:
        target = single_use_producer(mid, graph)
        if target is None or target.node.op_type == "Gemm":
            return False
        const = constant_array(other)
        if const is None or const.dtype != target.dtype:
            return False
        vector = _per_channel(const, target.weight.ndim, target.channels)
        out = node.outputs[0]
        if vector is None or not can_replace(out, mid):
            logger.debug("%s %s: constant is not per-channel", node.op_type, node.name)
            return False
        if node.op_type == "Add":
            target.shift(vector)
        else:
            target.scale(vector)
        target.commit(names)
        replace_value(out, mid)
        graph.remove(node, safe=True)
        logger.debug("folded %s %s into %s", node.op_type, node.name, target.node.name)
        return True
