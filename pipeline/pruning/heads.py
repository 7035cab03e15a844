"""Attention heads, found on ONNX Runtime's fused ``Attention`` op, and removed whole.

After ``fuse_attention`` an encoder layer's self-attention is one ``com.microsoft::Attention``
node: input ``x``, a constant packed weight ``[H_in, 3 * n * d]`` and bias ``[3 * n * d]``
(the Q, K and V sections side by side, each ``n`` heads of ``d`` columns), ``num_heads = n``;
its output ``[batch, seq, n * d]`` (the heads' outputs side by side) is read by the output
projection ``MatMul(., W_o [n * d, H])`` alone::

    x -> Attention(W_qkv, b_qkv, mask; num_heads=n) -> MatMul(W_o) -> Add(b_o) -> + x

Head ``i`` computes its output columns ``i*d .. i*d+d-1`` from its own Q, K and V columns only,
so removing it (its columns in each of the three sections of ``W_qkv`` and ``b_qkv``, its rows
of ``W_o``, ``num_heads - 1``) leaves every other head's output exactly as it was: the scale
``1/sqrt(d)`` depends on the head size, which does not change. The output projection is a
down projection like a feed-forward block's (``graph``), so the same moments, scores (summed
over a head's ``d`` channels) and refit apply.

Only the plain form is taken: no past state or ``present`` output read, equal Q/K/V sizes,
no rotary embedding inside the op, constant weights. The unfused form (MatMul / Reshape /
Transpose with head counts in the reshape constants) and decoders' ``GroupQueryAttention``
/ ``Attention``-23, whose KV heads are part of the model's cache interface, are not pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array
from pipeline.pruning import graph


@dataclass
class AttentionBlock:
    """One fused self-attention: the node, its heads, and its output projection."""

    node: ir.Node
    heads: int
    head_size: int
    down: ir.Node
    bias: tuple[ir.Node, int] | None
    residual: ir.Value | None = None
    activation: str = "Attention"

    @property
    def name(self) -> str:
        return self.node.name or self.down.name or "attention"

    @property
    def width(self) -> int:
        return self.heads * self.head_size

    @property
    def units(self) -> int:
        """What is kept or removed: heads."""
        return self.heads

    @property
    def hidden(self) -> ir.Value:
        """The heads' outputs side by side: the channels the output projection reads."""
        return self.down.inputs[0]

    def down_weight(self) -> np.ndarray:
        return constant_array(self.down.inputs[1])

    def channels(self, heads: np.ndarray) -> np.ndarray:
        """The output channels of ``heads`` (sorted head indices)."""
        return (heads[:, None] * self.head_size + np.arange(self.head_size)).reshape(-1)


def block_at(node: ir.Node) -> AttentionBlock | None:
    """The prunable attention block of a ``com.microsoft::Attention`` node, or None."""
    if node.domain != graph.MS_DOMAIN or node.op_type != "Attention" or len(node.inputs) < 3:
        return None
    if any(value is not None for value in node.inputs[4:]) or any(
        out.uses() or out.is_graph_output() for out in node.outputs[1:]
    ):
        return None  # past state, attention bias or present output: not this form
    if node.attributes.get_int("do_rotary", 0) or "qkv_hidden_sizes" in node.attributes:
        return None
    weight, bias = constant_array(node.inputs[1]), constant_array(node.inputs[2])
    heads = node.attributes.get_int("num_heads", 0)
    if weight is None or bias is None or weight.ndim != 2 or heads < 1:
        return None
    width = weight.shape[1] // 3
    if weight.shape[1] != 3 * width or bias.shape != (3 * width,) or width % heads:
        return None
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        return None
    down = uses[0].node
    projection = graph.matmul_weight(down)
    if projection is None or projection.shape[0] != width:
        return None
    return AttentionBlock(
        node, heads, width // heads, down, graph.bias_of(down), residual=graph.residual_of(down)
    )


def find_blocks(model: ir.Model) -> list[AttentionBlock]:
    """Every prunable attention block of the main graph, in graph order."""
    return [block for node in model.graph if (block := block_at(node)) is not None]


def prune(
    rewrite: graph.Rewrite,
    block: AttentionBlock,
    keep: np.ndarray,
    down_weight: np.ndarray,
    intercept: np.ndarray | None,
) -> None:
    """Keep the heads ``keep`` (sorted indices) of ``block``; ``down_weight`` (the kept heads'
    rows, refitted or not) and ``intercept`` as in ``Rewrite.down``."""
    channels = block.channels(keep)
    columns = np.concatenate([section * block.width + channels for section in range(3)])
    node = block.node
    rewrite.swap(node, 1, constant_array(node.inputs[1])[:, columns])
    rewrite.swap(node, 2, constant_array(node.inputs[2])[columns])
    node.attributes["num_heads"] = ir.AttrInt64("num_heads", len(keep))
    node.outputs[0].shape = graph.resized(node.outputs[0].shape, len(channels))
    rewrite.down(block.down, block.bias, down_weight, intercept)
