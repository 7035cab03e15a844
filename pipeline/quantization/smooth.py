"""SmoothQuant on normalization outputs: move activation outliers into the weights before int8.

int8 activations are scaled per tensor, so one outlier channel sets the step for all: in
all-MiniLM-L6-v2, channel 99 of the post-attention LayerNorm output reaches 28-30 where the
median channel maximum is ~1.75, in essentially every sentence (so clipping it, as percentile
or entropy calibration do, is worse). SmoothQuant (Xiao et al., 2023) divides each channel
``j`` of the activation by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies
row ``j`` of every weight that reads it by ``s_j``: the product is unchanged in exact
arithmetic, and both operands now have tamer ranges.

Here the activations are the outputs of LayerNormalization / SkipLayerNormalization /
(Skip)SimplifiedLayerNormalization / RMSNormalization read by weight MatMuls or a fused
``Attention`` (its packed Q/K/V weight). Those outputs also feed the residual stream, so the
division cannot be folded into the norm's gamma/beta: an explicit ``Mul`` by ``1 / s`` is put on
the branch to the weight consumers only. Channel maxima come from the calibration data, padded
positions included (measured on MiniLM: padding changed nothing). Measured there (pooled
cosine on held-out sentences, dynamic per-channel int8, fused graph): smoothing at alpha 0.5
cut the nodes that had to stay float from 9 to 2 for the same budget; alpha 0.7-0.9 did about
the same, 0.3 collapsed, and smoothing GELU outputs made things worse, so it is not done.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.quantization import guard

ALPHA = 0.5
NORM_OPS = {
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
}
WEIGHT_READERS = ("MatMul", "Attention")  # activation at input 0, weight [K, N] at input 1
SCALE_RANGE = (1e-4, 1e4)


def targets(model: onnx.ModelProto) -> list[tuple[str, list[onnx.NodeProto]]]:
    """(norm output, the weight readers of it) where every such weight is 2D, used once."""
    weights = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            uses[name] = uses.get(name, 0) + 1
            readers.setdefault(name, []).append((node, index))
    found = []
    for node in model.graph.node:
        if node.op_type not in NORM_OPS:
            continue
        out = node.output[0]
        chosen = [
            reader
            for reader, index in readers.get(out, [])
            if index == 0
            and reader.op_type in WEIGHT_READERS
            and len(reader.input) > 1
            and reader.input[1] in weights
            and len(weights[reader.input[1]].dims) == 2
            and uses[reader.input[1]] == 1
        ]
        if chosen:
            found.append((out, chosen))
    return found


def _channel_maxima(model: onnx.ModelProto, names: list[str], feeds: Sequence) -> dict:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
        for n in names
        if n not in present
    )
    session = guard.session(probe, "disable_all")
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        outputs = guard.run(session, feed)
        for name in names:
            value = np.abs(np.asarray(outputs[name], np.float64))
            channel = value.reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = channel if name not in maxima else np.maximum(maxima[name], channel)
    return maxima


def smooth(
    model: onnx.ModelProto, feeds: Sequence[dict], alpha: float = ALPHA
) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with its normalization outputs smoothed; and how many were.

    Exact in float arithmetic up to rounding: every smoothed activation is divided by ``s``
    on its way to weights whose rows were multiplied by ``s``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"smooth alpha must be in (0, 1), got {alpha}")
    found = targets(model)
    if not found or not feeds:
        return model, 0
    maxima = _channel_maxima(model, [out for out, _ in found], feeds)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    weights = {i.name: i for i in result.graph.initializer}
    nodes = {n.name: n for n in result.graph.node}
    position = {id(n): i for i, n in enumerate(result.graph.node)}
    inserts = []
    for out, readers in found:
        arrays = [numpy_helper.to_array(weights[r.input[1]]) for r in readers]
        activation = maxima[out]
        if any(a.shape[0] != activation.shape[0] for a in arrays):
            continue
        weight_max = np.max([np.abs(a).max(axis=1) for a in arrays], axis=0)
        with np.errstate(all="ignore"):
            scale = activation**alpha / weight_max ** (1 - alpha)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        scale = np.clip(scale, *SCALE_RANGE).astype(np.float32)
        smoothed, inverse = f"{out}_smoothed", f"{out}_smooth_inverse"
        result.graph.initializer.append(numpy_helper.from_array(1.0 / scale, inverse))
        first = min(position[id(nodes[r.name])] for r in readers)
        inserts.append(
            (first, helper.make_node("Mul", [out, inverse], [smoothed], name=f"{out}_smooth"))
        )
        for reader, array in zip(readers, arrays, strict=True):
            twin = nodes[reader.name]
            twin.input[0] = smoothed
            weights[twin.input[1]].CopyFrom(
                numpy_helper.from_array(array * scale[:, None], twin.input[1])
            )
    for index, node in sorted(inserts, key=lambda item: -item[0]):
        result.graph.node.insert(index, node)
    return result, len(inserts)
