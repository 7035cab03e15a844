"""The node a per-channel affine map folds into (Conv, ConvTranspose, Gemm, 2-D MatMul),
shared by fuse_conv_bn (BatchNormalization) and fuse_conv_affine (per-channel Mul/Add).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array, is_standard
from graph_passes.match import new_initializer

FLOAT_TYPES = (np.float16, np.float32, np.float64)


class ChannelNode:
    """A Conv, ConvTranspose or Gemm whose per-output-channel affine map can absorb another.

    ``weight``/``bias`` are float64 copies; ``scale``/``shift`` update them and ``commit``
    writes new initializers into the node. Nothing in the graph changes before ``commit``.
    """

    def __init__(self, node: ir.Node, weight: np.ndarray, bias: np.ndarray, channels: int):
        self.node = node
        self.dtype = weight.dtype
        self.weight = weight.astype(np.float64)
        self.bias = bias.astype(np.float64)
        self.channels = channels

    @classmethod
    def match(cls, node: ir.Node) -> ChannelNode | None:
        """The node's constant weights when it is a supported producer, else None."""
        if not is_standard(node) or node.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            return None
        inputs = list(node.inputs)
        if len(inputs) < 2 or inputs[0] is None:
            return None
        weight = constant_array(inputs[1])
        if weight is None or weight.dtype.type not in FLOAT_TYPES:
            return None
        has_bias = len(inputs) > 2 and inputs[2] is not None
        bias = constant_array(inputs[2]) if has_bias else None
        if has_bias and (bias is None or bias.dtype != weight.dtype):
            return None
        if node.op_type == "Gemm":
            return cls._match_gemm(node, weight, bias)
        group = node.attributes.get_int("group", 1)
        if weight.ndim < 3 or group < 1:
            return None
        if node.op_type == "Conv":
            channels = weight.shape[0]
        else:
            if weight.shape[0] % group:
                return None
            channels = weight.shape[1] * group
        if channels == 0 or channels % group:
            return None
        if bias is None:
            bias = np.zeros(channels, dtype=weight.dtype)
        if bias.shape != (channels,):
            return None
        return cls(node, weight, bias, channels)

    @classmethod
    def _match_gemm(
        cls, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None
    ) -> ChannelNode | None:
        if weight.ndim != 2:  # Gemm's output is 2-D, so BN's channel axis 1 is N
            return None
        channels = weight.shape[0] if node.attributes.get_int("transB", 0) else weight.shape[1]
        beta = node.attributes.get_float("beta", 1.0)
        if bias is None:
            bias = np.zeros(channels, dtype=weight.dtype)
        elif bias.shape in ((channels,), (1, channels), (), (1,)):
            bias = np.broadcast_to(bias.astype(np.float64) * beta, (channels,))
        else:
            return None
        return cls(node, weight, bias.astype(weight.dtype), channels)

    @classmethod
    def match_matmul(cls, node: ir.Node) -> ChannelNode | None:
        """A 2-D ``MatMul(A, B)`` with constant ``[K, N]`` ``B`` (a bias-free Gemm), else None."""
        if not is_standard(node) or node.op_type != "MatMul" or len(node.inputs) != 2:
            return None
        a, out = node.inputs[0], node.outputs[0]
        ranks = {len(v.shape) for v in (a, out) if v is not None and v.shape is not None}
        if ranks != {2}:
            return None
        weight = constant_array(node.inputs[1])
        if weight is None or weight.dtype.type not in FLOAT_TYPES or weight.ndim != 2:
            return None
        return cls(node, weight, np.zeros(weight.shape[1], dtype=weight.dtype), weight.shape[1])

    def scale(self, s: np.ndarray) -> None:
        """Multiply output channel ``c`` by ``s[c]`` (weight and bias)."""
        node, w = self.node, self.weight
        if node.op_type == "Conv":
            self.weight = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        elif node.op_type == "ConvTranspose":
            g = node.attributes.get_int("group", 1)
            view = w.reshape((g, w.shape[0] // g, w.shape[1]) + w.shape[2:])
            s_view = s.reshape((g, 1, w.shape[1]) + (1,) * (w.ndim - 2))
            self.weight = (view * s_view).reshape(w.shape)
        elif node.attributes.get_int("transB", 0):  # Gemm B: [N, K]
            self.weight = w * s.reshape(-1, 1)
        else:  # Gemm or MatMul B: [K, N]
            self.weight = w * s.reshape(1, -1)
        self.bias = self.bias * s

    def shift(self, t: np.ndarray) -> None:
        """Add ``t[c]`` to output channel ``c``."""
        self.bias = self.bias + t

    def commit(self, names: set[str]) -> None:
        """Write the new weight and bias as fresh initializers of the node's graph."""
        node = self.node
        graph = node.graph
        assert isinstance(graph, ir.Graph)
        if node.op_type == "MatMul":  # now with a bias: a Gemm (alpha 1, no transposes)
            node.op_type = "Gemm"
        base = node.name or node.outputs[0].name or node.op_type
        w_value = new_initializer(
            graph, names, f"{base}_fused_weight", self.weight.astype(self.dtype)
        )
        b_value = new_initializer(graph, names, f"{base}_fused_bias", self.bias.astype(self.dtype))
        node.replace_input_with(1, w_value)
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, b_value)
        if node.op_type == "Gemm":
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)


def single_use_producer(value: ir.Value | None, graph: ir.Graph) -> ChannelNode | None:
    """The supported producer of ``value`` when ``value`` is its only, non-output, use."""
    if value is None or value.is_graph_output() or len(value.uses()) != 1:
        return None
    producer = value.producer()
    if producer is None or producer.graph is not graph or len(producer.outputs) != 1:
        return None
    return ChannelNode.match(producer)


def single_use_matmul(value: ir.Value, graph: ir.Graph) -> ChannelNode | None:
    """Like ``single_use_producer`` for a 2-D MatMul (BN only: an Add after a MatMul is
    not turned into a Gemm, which measured no faster in ORT than MatMul + Add)."""
    if value is None or value.is_graph_output() or len(value.uses()) != 1:
        return None
    producer = value.producer()
    if producer is None or producer.graph is not graph:
        return None
    return ChannelNode.match_matmul(producer)
