"""Fold an inference-mode BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul
before it.

Exporters of models trained with batch norm (ResNet, MobileNet, the old model zoo) leave
``Conv -> BatchNormalization``; at inference BN is a per-channel affine map, so it folds into
the weights and bias of the node that feeds it::

    before:  c = Conv(x, W, B);   y = BatchNormalization(c, gamma, beta, mean, var)
    after:   y = Conv(x, W', B')

    s  = gamma / sqrt(var + eps)                       (eps: the BN attribute, default 1e-5)
    W' = W * s  along the output-channel axis          Conv: axis 0, [C_out, C_in/g, k...]
    B' = (B - mean) * s + beta                         (B = 0 when the Conv has none)

ConvTranspose weights are ``[C_in, C_out/g, k...]``: output channel ``gi * C_out/g + j`` is
``W[gi * C_in/g + i, j]``, so ``W`` is viewed as ``[g, C_in/g, C_out/g, k...]`` and scaled
along axis 2 by ``s`` viewed as ``[g, 1, C_out/g, 1...]``. Gemm (2-D, so BN's channel axis 1
is the Gemm's output features ``N``): ``Y = alpha * A @ B + beta * C`` becomes
``alpha * A @ (B * s) + C'`` with ``C' = (beta * C - mean) * s + beta_bn`` and ``beta = 1``;
``B`` is scaled along its ``N`` axis (1, or 0 with ``transB``), ``C`` must be ``[N]``,
``[1, N]`` or a scalar. MatMul with a constant 2-D ``B`` ``[K, N]`` whose output is known
to be 2-D (from its own or its input's shape) is a Gemm without bias, so it becomes
``Gemm(A, B * s, -mean * s + beta_bn)``; a MatMul output of rank 3 or more is left alone,
since BN then normalizes axis 1 (the sequence), not the features.

Only fires when every weight and BN parameter is a true constant (``constant_array``: an
initializer that is also a graph input can be overridden, so it is not one), the node's
output has the BN as its only use and is not a graph output, the BN is in inference form
(one output; from opset 14 also ``training_mode = 0`` with unused extra outputs; opset 7
``spatial = 0`` is skipped), every parameter is 1-D with the node's channel count, and the
weight is float16/32/64. The math is done in float64 and cast back to the weight's dtype.
New initializers are created (never mutating a tensor: ``W`` may be shared by another node);
the old ones are left to ``remove_dead``. The BN's output value keeps its name, type and
shape (``replace_value``), so a graph output stays a graph output.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import GraphPass, can_replace, constant_array, is_standard, replace_value

logger = logging.getLogger(__name__)

# BatchNormalization grew ``training_mode`` (and inference with optional outputs) in opset 14.
TRAINING_MODE_OPSET = 14
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
        w_value = _initializer(graph, names, f"{base}_fused_weight", self.weight.astype(self.dtype))
        b_value = _initializer(graph, names, f"{base}_fused_bias", self.bias.astype(self.dtype))
        node.replace_input_with(1, w_value)
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, b_value)
        if node.op_type == "Gemm":
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)


def _initializer(graph: ir.Graph, names: set[str], base: str, array: np.ndarray) -> ir.Value:
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    value = ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def all_names(model: ir.Model) -> set[str]:
    """Every value name in the model (for choosing fresh initializer names)."""
    names: set[str] = set()
    for graph in model.graphs():
        values = [
            *graph.inputs,
            *graph.initializers.values(),
            *(v for n in graph for v in n.outputs),
        ]
        names.update(v.name for v in values if v.name)
    return names


def single_use_producer(value: ir.Value | None, graph: ir.Graph) -> ChannelNode | None:
    """The supported producer of ``value`` when ``value`` is its only, non-output, use."""
    if value is None or value.is_graph_output() or len(value.uses()) != 1:
        return None
    producer = value.producer()
    if producer is None or producer.graph is not graph or len(producer.outputs) != 1:
        return None
    return ChannelNode.match(producer)


def _single_use_matmul(value: ir.Value, graph: ir.Graph) -> ChannelNode | None:
    """Like ``single_use_producer`` for a 2-D MatMul (BN only: an Add after a MatMul is
    not turned into a Gemm, which measured no faster in ORT than MatMul + Add)."""
    if value is None or value.is_graph_output() or len(value.uses()) != 1:
        return None
    producer = value.producer()
    if producer is None or producer.graph is not graph:
        return None
    return ChannelNode.match_matmul(producer)


def _is_inference_bn(bn: ir.Node, opset: int) -> bool:
    if bn.attributes.get_int("spatial", 1) != 1 or len(bn.inputs) != 5:
        return False
    if (bn.version or opset) < TRAINING_MODE_OPSET:  # extra outputs mean training mode
        return all(not v.name for v in bn.outputs[1:])
    extra = [v for v in bn.outputs[1:] if v.uses() or v.is_graph_output()]
    return bn.attributes.get_int("training_mode", 0) == 0 and not extra


class FuseConvBatchNorm(GraphPass):
    """Fold inference BatchNormalization into a preceding Conv, ConvTranspose or Gemm."""

    name: ClassVar[str] = "fuse_conv_bn"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        names = all_names(model)
        for graph in model.graphs():
            for bn in list(graph):
                if bn.op_type != "BatchNormalization" or not is_standard(bn):
                    continue
                if not _is_inference_bn(bn, opset):
                    continue
                target = single_use_producer(bn.inputs[0], graph)
                target = target or _single_use_matmul(bn.inputs[0], graph)
                if target is None:
                    continue
                params = [constant_array(v) for v in bn.inputs[1:]]
                if any(p is None or p.shape != (target.channels,) for p in params):
                    logger.debug("BN %s: parameters not constant [%d]", bn.name, target.channels)
                    continue
                gamma, beta, mean, var = (p.astype(np.float64) for p in params)
                eps = bn.attributes.get_float("epsilon", 1e-5)
                out = bn.outputs[0]
                if not can_replace(out, target.node.outputs[0]):
                    continue
                s = gamma / np.sqrt(var + eps)
                target.shift(-mean)
                target.scale(s)
                target.shift(beta)
                target.commit(names)
                replace_value(out, target.node.outputs[0])
                graph.remove(bn, safe=True)
                self.matches += 1
                logger.debug("folded BN %s into %s", bn.name, target.node.name)
        return self.result(model)
