"""Fold a zero constant Pad into the ``pads`` of the Conv or AveragePool that reads it.

Exporters of TensorFlow/Keras and Paddle models (``padding="same"`` with asymmetric pads,
``ZeroPad2d`` layers) emit an explicit Pad before a Conv; the Conv can pad by itself, which
saves one full copy of the activation::

    before:  p = Pad(x, pads=[0, 0, t, l, 0, 0, b, r], mode="constant", value=0)
             y = Conv(p, W, B, pads=[t0, l0, b0, r0])
    after:   y = Conv(x, W, B, pads=[t0 + t, l0 + l, b0 + b, r0 + r])

ONNX pads list every begin first, then every end: ``[x1_begin, x2_begin, ..., x1_end, ...]``
over the input's axes (or over ``axes`` from opset 18); Conv/pool pads do the same over the
spatial axes only. A Conv over an input padded by zeros equals a Conv whose own (zero)
padding is wider, exactly, for any strides, dilations and groups.

Only fires when: the Pad is ``constant`` mode with value 0 (a true constant, or absent),
its pads are a true constant, non-negative (negative pads crop) and zero on the batch and
channel axes; the Pad output's only use is the Conv's data input and it is not a graph
output; the Conv has ``auto_pad`` NOTSET (SAME_* computes pads from the input size, which
the Pad changed). AveragePool only with ``count_include_pad=1`` (otherwise the padded zeros
would drop out of the divisor) and ``ceil_mode=0`` (with ceil_mode, a last window that runs
past the padding is averaged over fewer elements, which differs from the explicit zeros),
and only while every resulting pad stays smaller than the kernel (ORT refuses larger ones).
MaxPool is left alone: its padding is -inf, not 0, and its optional Indices output would
refer to the padded tensor. New ``pads`` are written as an attribute (Conv and pools always
take them so); the Pad node is removed, its constants are left to ``remove_dead``.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array, is_standard
from graph_passes.fusion import Fusion

logger = logging.getLogger(__name__)

# Pad took ``pads``/``constant_value`` as inputs instead of attributes from opset 11, and an
# optional ``axes`` input from opset 18.
PADS_INPUT_OPSET = 11


def _pad_amounts(pad: ir.Node, opset: int, rank: int | None) -> np.ndarray | None:
    """The Pad's per-axis ``[rank, 2]`` (begin, end) amounts when it pads with constant
    zeros by constant amounts, else None."""
    mode = pad.attributes.get_string("mode", "constant")
    if mode != "constant":
        return None
    if (pad.version or opset) < PADS_INPUT_OPSET:
        pads = pad.attributes.get_ints("pads", None)
        if pads is None or pad.attributes.get_float("value", 0.0) != 0.0:
            return None
        pads = np.asarray(pads, dtype=np.int64)
        axes = None
    else:
        inputs = list(pad.inputs) + [None] * (4 - len(pad.inputs))
        pads = constant_array(inputs[1])
        if pads is None:
            return None
        if inputs[2] is not None:
            value = constant_array(inputs[2])
            if value is None or value.size != 1 or value.reshape(()).item() != 0:
                return None
        axes = None
        if inputs[3] is not None:
            axes = constant_array(inputs[3])
            if axes is None or rank is None:
                return None
    pads = pads.reshape(-1).astype(np.int64)
    if pads.size % 2 or (pads < 0).any():
        return None
    pairs = pads.reshape(2, -1).T  # [n, 2]
    if axes is None:
        if rank is not None and pairs.shape[0] != rank:
            return None
        return pairs
    assert rank is not None
    axes = [int(a) + rank if int(a) < 0 else int(a) for a in axes.reshape(-1)]
    if len(axes) != pairs.shape[0] or len(set(axes)) != len(axes):
        return None
    if any(not 0 <= a < rank for a in axes):
        return None
    full = np.zeros((rank, 2), dtype=np.int64)
    full[axes] = pairs
    return full


def _absorbs_zero_padding(node: ir.Node) -> bool:
    """Whether ``node`` pads its data input with zeros that count like real zeros."""
    if not is_standard(node) or node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return False
    if node.op_type == "Conv":
        return True
    if node.op_type == "AveragePool":
        return (
            node.attributes.get_int("count_include_pad", 0) == 1
            and node.attributes.get_int("ceil_mode", 0) == 0
        )
    return False


class FusePadConv(Fusion):
    """Fold ``Pad(constant 0) -> Conv/AveragePool(count_include_pad=1)`` into the node's pads."""

    name: ClassVar[str] = "fuse_pad_conv"
    position: ClassVar[int] = 30

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        for graph in model.graphs():
            for node in list(graph):
                if node.op_type in ("Conv", "AveragePool") and self._fold(node, graph, opset):
                    self.matches += 1
        return self.result(model)

    def _fold(self, node: ir.Node, graph: ir.Graph, opset: int) -> bool:
        if not node.inputs or not _absorbs_zero_padding(node):
            return False
        padded = node.inputs[0]
        if padded is None or padded.is_graph_output() or len(padded.uses()) != 1:
            return False
        pad = padded.producer()
        if pad is None or pad.op_type != "Pad" or not is_standard(pad) or pad.graph is not graph:
            return False
        x = pad.inputs[0]
        if x is None:
            return False
        rank = len(x.shape) if x.shape is not None else None
        amounts = _pad_amounts(pad, opset, rank)
        if amounts is None or amounts.shape[0] < 3 or amounts[:2].any():
            logger.debug("Pad %s: not a constant zero pad of spatial axes only", pad.name)
            return False
        spatial = amounts.shape[0] - 2
        old = node.attributes.get_ints("pads", None)
        old = np.zeros(2 * spatial, dtype=np.int64) if old is None else np.asarray(old)
        if old.shape != (2 * spatial,):
            return False
        new = old + amounts[2:].T.reshape(-1)
        if node.op_type == "AveragePool":  # ORT rejects a pool whose pads reach the kernel
            kernel = node.attributes.get_ints("kernel_shape", None)
            if kernel is None or len(kernel) != spatial or (new >= np.tile(kernel, 2)).any():
                return False
        node.attributes["pads"] = ir.AttrInt64s("pads", [int(v) for v in new])
        node.replace_input_with(0, x)
        graph.remove(pad, safe=True)
        logger.debug("folded Pad %s into %s %s", pad.name, node.op_type, node.name)
        return True
