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

from graph_passes.base import can_replace, constant_array, is_standard, replace_value
from graph_passes.fusion import Fusion
from graph_passes.fusions._channel_affine import single_use_matmul, single_use_producer
from graph_passes.match import all_names

logger = logging.getLogger(__name__)

# BatchNormalization grew ``training_mode`` (and inference with optional outputs) in opset 14.
TRAINING_MODE_OPSET = 14


def _is_inference_bn(bn: ir.Node, opset: int) -> bool:
    if bn.attributes.get_int("spatial", 1) != 1 or len(bn.inputs) != 5:
        return False
    if (bn.version or opset) < TRAINING_MODE_OPSET:  # extra outputs mean training mode
        return all(not v.name for v in bn.outputs[1:])
    extra = [v for v in bn.outputs[1:] if v.uses() or v.is_graph_output()]
    return bn.attributes.get_int("training_mode", 0) == 0 and not extra


class FuseConvBatchNorm(Fusion):
    """Fold inference BatchNormalization into a preceding Conv, ConvTranspose or Gemm."""

    name: ClassVar[str] = "fuse_conv_bn"
    position: ClassVar[int] = 10

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
                target = target or single_use_matmul(bn.inputs[0], graph)
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
