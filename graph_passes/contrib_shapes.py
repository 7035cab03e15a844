"""Output shapes of the com.microsoft ops our fusions emit, which ONNX inference cannot know.

ONNX's shape inference has no schema for contrib ops, so everything downstream of a fused
attention or SkipLayerNormalization loses its shape, and a later fusion that must prove two
tensors have one shape (SkipLayerNormalization's residual Add) refuses. The rules here are
the ops' documented output shapes, stated in the input's own symbols:

    SkipLayerNormalization, SkipSimplifiedLayerNormalization, BiasGelu, FastGelu, Gelu,
    QuickGelu, BiasAdd                     output 0 = input 0's shape
    Attention (packed QKV, no qkv_hidden_sizes)   [B, S, W / 3]   (W: weights' last dim)
    MultiHeadAttention (3D query)          [B, S, V]  (V: 3D value's last dim, or H * D of a
                                           4D (B, H, T, D) value)
"""

from __future__ import annotations

import onnx_ir as ir

CONTRIB_DOMAIN = "com.microsoft"
SAME_SHAPE_OPS = frozenset(
    {
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "BiasGelu",
        "FastGelu",
        "Gelu",
        "QuickGelu",
        "BiasAdd",
    }
)


def _dims(value: ir.Value | None) -> list | None:
    if value is None or value.shape is None:
        return None
    return list(value.shape)


def output_shape(node: ir.Node) -> ir.Shape | None:
    """The shape of the node's first output by the op's definition, or None when unknown."""
    if node.domain != CONTRIB_DOMAIN or not node.inputs:
        return None
    first = _dims(node.inputs[0])
    if first is None:
        return None
    if node.op_type in SAME_SHAPE_OPS:
        return ir.Shape(first)
    if len(first) != 3:
        return None
    if node.op_type == "Attention" and "qkv_hidden_sizes" not in node.attributes:
        weights = _dims(node.inputs[1]) if len(node.inputs) > 1 else None
        if weights and isinstance(weights[-1], int) and weights[-1] % 3 == 0:
            return ir.Shape([first[0], first[1], weights[-1] // 3])
    if node.op_type == "MultiHeadAttention" and len(node.inputs) > 2:
        value = _dims(node.inputs[2])
        if value is not None and len(value) == 3 and isinstance(value[-1], int):
            return ir.Shape([first[0], first[1], value[-1]])
        if value is not None and len(value) == 4 and all(isinstance(d, int) for d in value[1::2]):
            return ir.Shape([first[0], first[1], value[1] * value[3]])
    return None


def propagate(model: ir.Model) -> int:
    """Set the first-output shape of every contrib node that lacks one; returns how many."""
    count = 0
    for graph in model.graphs():
        for node in graph:
            out = node.outputs[0] if node.outputs else None
            if out is None or out.shape is not None:
                continue
            shape = output_shape(node)
            if shape is not None:
                out.shape = shape
                if out.type is None:  # every op here returns its first input's dtype
                    out.type = node.inputs[0].type
                count += 1
    return count
