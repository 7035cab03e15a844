"""The accuracy guard: measure a lowered model against fp32, rank nodes by sensitivity.

**Accuracy** is the mean cosine similarity to the fp32 outputs, per float output, over every
reference input set. Cosines are taken per vector, not over the whole tensor (one bad token
drowns in a whole-tensor cosine): a rank-2 output ``[batch, features]`` per row, a rank >= 3
output per ``[i, j]`` slice (per token for ``[batch, seq, hidden]``, per channel map for
``[batch, C, H, W]``), a rank <= 1 output as one vector. The budget ``max_cosine_drop`` holds
when ``1 - mean_cosine <= max_cosine_drop`` for every float output. Integer outputs (token
ids, class ids) are reported as the fraction of equal elements.

**Padding is not scored.** When the model takes an attention mask (an integer input whose
name contains ``mask``, shape ``[B, S]``), a float output whose first two dimensions are that
``[B, S]`` (``last_hidden_state [B, S, H]``, per-token logits) is scored on the positions
where the mask is non-zero only: a padded position's vector is whatever the model computes
from nothing, its error is noise no user sees, and scoring it made per-channel int8 MiniLM
read 0.93 instead of 0.989 and the guard exclude far too many nodes. Such outputs report
``mean_cosine_masked`` / ``min_cosine_masked`` (and ``masked_by``: the mask input) instead
of ``mean_cosine`` / ``min_cosine``; ``max_abs_error`` is over the same positions.

**Sensitivity** follows ORT's ``qdq_loss_debug``: the signal-to-quantization-noise ratio
``SQNR = 20 log10(||x|| / ||x - q(x)||)`` of each tensor a quantized node reads, where
``q`` is the quantize-dequantize round trip the tier applies (weights: int8 per channel or
per tensor, int4 per block, fp16 rounding; activations: uint8 with the run's own min/max for
dynamic, the scale and zero point ORT wrote for static). The fp32 model runs once with every
such activation added as an output; noise and signal energies are accumulated per tensor
over the input sets, so memory does not grow with the data. A node's noise-to-signal ratio
is the sum of its inputs' (relative errors of a product add), and the node with the lowest
SQNR is the first to stay in float. MatMul and Gemm are measured better, at their OUTPUT:
the product is recomputed in numpy from exact and from round-tripped inputs, so noise is
weighted by the weights it meets (an activation channel with a huge outlier but a ~0 weight
row looks harmless at the input and ruins the output; input SQNR would miss it).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from pipeline.quantization.tiers import Tier
from pipeline.runtime.sessions import open_session

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


def session(model: onnx.ModelProto | str, optimization: str = "all") -> ort.InferenceSession:
    """A CPU session; quantized models are measured as they will run (ORT fusions on)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimization == "all"
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    source = model if isinstance(model, str) else model.SerializeToString()
    return open_session(source, options)


def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, object]:
    wanted = {i.name for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values, strict=True))


def _vectors(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array, dtype=np.float64)
    if a.ndim <= 1:
        return a.reshape(1, -1)
    if a.ndim == 2:
        return a
    return a.reshape(a.shape[0] * a.shape[1], -1)


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine per vector (see module docstring); both zero -> 1, one zero -> 0."""
    a, b = _vectors(reference), _vectors(candidate)
    finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    a = np.where(np.isfinite(a), a, 0.0)
    b = np.where(np.isfinite(b), b, 0.0)
    scale = np.maximum(np.abs(a).max(axis=1, initial=0.0), np.abs(b).max(axis=1, initial=0.0))
    scale = np.where(scale == 0, 1.0, scale)[:, None]
    a, b = a / scale, b / scale
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    with np.errstate(all="ignore"):
        cos = np.where((na == 0) & (nb == 0), 1.0, dot / (na * nb))
    cos = np.where(np.isnan(cos), 0.0, cos)
    # A NaN/inf that the reference does not have is a broken vector: cosine 0.
    ref_finite = np.isfinite(_vectors(reference)).all(axis=1)
    cos = np.where(finite | ~ref_finite, cos, 0.0)
    return np.clip(cos, -1.0, 1.0)


@dataclass
class OutputAccuracy:
    """Accuracy of one output over all input sets."""

    name: str
    kind: str  # float | exact
    mean_cosine: float | None = None
    min_cosine: float | None = None
    max_abs_error: float | None = None
    match_fraction: float | None = None  # exact outputs: share of equal elements
    masked_by: str | None = None  # the mask input whose padded positions were not scored

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.masked_by is not None:
            for key in ("mean_cosine", "min_cosine"):
                if key in data:
                    data[key + "_masked"] = data.pop(key)
        return data


@dataclass
class Accuracy:
    outputs: dict[str, OutputAccuracy] = field(default_factory=dict)

    def worst(self) -> OutputAccuracy | None:
        floats = [o for o in self.outputs.values() if o.kind == "float"]
        return min(floats, key=lambda o: o.mean_cosine, default=None)

    def within(self, max_cosine_drop: float) -> bool:
        worst = self.worst()
        exact_ok = all(o.match_fraction == 1.0 for o in self.outputs.values() if o.kind == "exact")
        if worst is None:
            return exact_ok
        return 1.0 - worst.mean_cosine <= max_cosine_drop + 1e-12

    def summary(self, max_cosine_drop: float) -> str:
        worst = self.worst()
        if worst is None:
            return "no float outputs"
        floor = 1.0 - max_cosine_drop
        relation = ">=" if worst.mean_cosine >= floor - 1e-12 else "<"
        where = " (padding not scored)" if worst.masked_by else ""
        return (
            f"mean cosine {worst.mean_cosine:.4f} {relation} {floor:.4f} on '{worst.name}'{where}"
        )

    def flat(self) -> dict[str, float]:
        """Output name -> mean cosine (float outputs) or match fraction (exact outputs)."""
        return {
            name: (o.mean_cosine if o.kind == "float" else o.match_fraction)
            for name, o in self.outputs.items()
        }

    def to_dict(self) -> dict:
        return {name: o.to_dict() for name, o in self.outputs.items()}


def mask_input(feeds: Mapping[str, object]) -> str | None:
    """The attention-mask-like input of a feed: integer (or bool), rank 2, named *mask*."""
    for name, value in feeds.items():
        if (
            "mask" in name.lower()
            and isinstance(value, np.ndarray)
            and value.ndim == 2
            and value.dtype.kind in "iub"
        ):
            return name
    return None


def _masked(
    ref: np.ndarray, cand: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Drop padded positions (mask == 0) of outputs shaped [B, S, ...] like the mask."""
    if mask is None or ref.ndim < 2 or ref.shape[:2] != mask.shape or cand.shape != ref.shape:
        return ref, cand, False
    keep = np.asarray(mask) != 0
    if ref.ndim == 2:  # per-token scalars: one vector per row, padded entries zeroed in both
        return np.where(keep, ref, 0), np.where(keep, cand, 0), True
    return ref[keep], cand[keep], True


def accuracy_of(
    reference_sets: Sequence[Mapping[str, object]],
    candidate_sets: Sequence[Mapping[str, object]],
    feed_sets: Sequence[Mapping[str, object]] | None = None,
) -> Accuracy:
    """Compare candidate outputs with fp32 reference outputs, set by set (pure function).

    ``feed_sets`` (the inputs the outputs were computed from) let padded positions be left
    out (see the module docstring); without them every position is scored.
    """
    sums: dict[str, list] = {}
    masked_by: dict[str, str] = {}
    result = Accuracy()
    feed_list = list(feed_sets) if feed_sets is not None else [None] * len(reference_sets)
    for ref_outputs, cand_outputs, feeds in zip(
        reference_sets, candidate_sets, feed_list, strict=True
    ):
        mask_name = mask_input(feeds) if feeds is not None else None
        mask = feeds[mask_name] if mask_name is not None else None
        for name, ref in ref_outputs.items():
            if not isinstance(ref, np.ndarray):
                continue  # sequence/map outputs: the comparer's business
            cand = np.asarray(cand_outputs.get(name))
            stats = sums.setdefault(name, [None, 0.0, 0, math.inf, 0.0, 0, 0])
            if ref.dtype.kind == "f":
                stats[0] = "float"
                if cand.shape != ref.shape:
                    cos = np.zeros(1)
                    err = math.inf
                else:
                    ref, cand, masked = _masked(ref, cand, mask)
                    if masked:
                        masked_by[name] = mask_name
                    cos = row_cosines(ref, cand) if ref.size else np.zeros(0)
                    with np.errstate(all="ignore"):
                        diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
                    finite = diff[np.isfinite(diff)]
                    err = float(finite.max()) if finite.size == diff.size and diff.size else 0.0
                    err = err if finite.size == diff.size else math.inf
                stats[1] += float(cos.sum())
                stats[2] += cos.size
                stats[3] = min(stats[3], float(cos.min()) if cos.size else 1.0)
                stats[4] = max(stats[4], err)
            else:
                stats[0] = "exact"
                equal = int((cand == ref).sum()) if cand.shape == ref.shape else 0
                stats[5] += equal
                stats[6] += ref.size
    for name, (kind, total, count, low, err, equal, size) in sums.items():
        if kind == "float":
            result.outputs[name] = OutputAccuracy(
                name,
                "float",
                total / count if count else 1.0,
                low,
                err,
                masked_by=masked_by.get(name),
            )
        else:
            result.outputs[name] = OutputAccuracy(
                name, "exact", match_fraction=equal / size if size else 1.0
            )
    return result


# ---------------------------------------------------------------------------------------------
# Sensitivity


@dataclass(frozen=True)
class Scheme:
    """How the tier quantizes, enough to simulate its round trip in numpy."""

    tier: Tier
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_weights: bool = True
    block_size: int = 32


def _weight_axis(node: onnx.NodeProto, index: int, rank: int) -> int | None:
    """Per-channel axis ORT uses for this weight input (None: per tensor)."""
    if node.op_type in ("Conv",) and index == 1:
        return 0
    if node.op_type == "ConvTranspose" and index == 1:
        return 1
    if node.op_type == "Gemm" and index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and index == 1 and rank >= 2:
        return rank - 1
    return None


def _qdq_weight(w: np.ndarray, axis: int | None, scheme: Scheme) -> np.ndarray:
    w = w.astype(np.float64)
    if scheme.tier.half:
        return w.astype(np.float16).astype(np.float64)
    if scheme.tier.weight_only_bits is not None:
        if w.ndim != 2:
            return w
        k, n = w.shape
        pad = (-k) % scheme.block_size
        blocks = np.pad(w, ((0, pad), (0, 0))).reshape(-1, scheme.block_size, n)
        top = 2 ** (scheme.tier.weight_only_bits - 1) - 1  # 7 for 4 bits
        scale = np.abs(blocks).max(axis=1, keepdims=True) / top
        scale = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.round(blocks / scale), -top - 1, top) * scale
        return q.reshape(-1, n)[:k]
    qmax = 63.0 if scheme.reduce_range else 127.0
    if axis is None or not scheme.per_channel:
        reduce_axes = None
    else:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    if scheme.symmetric_weights:
        scale = np.abs(w).max(axis=reduce_axes, keepdims=True) / qmax
        scale = np.where(scale == 0, 1.0, scale)
        return np.clip(np.round(w / scale), -qmax, qmax) * scale
    lo = np.minimum(w.min(axis=reduce_axes, keepdims=True), 0)
    hi = np.maximum(w.max(axis=reduce_axes, keepdims=True), 0)
    scale = np.where(hi > lo, (hi - lo) / (2 * qmax + 1), 1.0)
    zero = np.round(-qmax - 1 - lo / scale)
    return (np.clip(np.round(w / scale) + zero, -qmax - 1, qmax) - zero) * scale


def _qdq_activation(
    x: np.ndarray, scheme: Scheme, params: tuple[float, int, str] | None
) -> np.ndarray:
    x = x.astype(np.float64)
    if scheme.tier.half:
        return x.astype(np.float16).astype(np.float64)
    if params is not None:  # static: ORT's calibrated scale / zero point
        scale, zero, dtype = params
        lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
        return (np.clip(np.round(x / scale) + zero, lo, hi) - zero) * scale
    lo, hi = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _static_params(quantized: onnx.ModelProto) -> dict[str, tuple[float, int, str]]:
    """Tensor -> (scale, zero point, dtype) from ORT's ``<tensor>_scale`` initializers."""
    inits = {i.name: i for i in quantized.graph.initializer}
    params = {}
    for name, init in inits.items():
        if not name.endswith("_scale") or init.dims:
            continue
        tensor = name[: -len("_scale")]
        zp = inits.get(tensor + "_zero_point")
        if zp is None:
            continue
        zero = numpy_helper.to_array(zp)
        dtype = "uint8" if zero.dtype == np.uint8 else "int8"
        params[tensor] = (float(numpy_helper.to_array(init)), int(zero), dtype)
    return params


def quantized_nodes(fp32: onnx.ModelProto, quantized: onnx.ModelProto, op_types) -> list[str]:
    """Names of fp32 nodes of ``op_types`` that the quantizer replaced or fed from Q/DQ."""
    after = {n.name: n for n in quantized.graph.node}
    producers = {out: n for n in quantized.graph.node for out in n.output}
    names = []
    for node in fp32.graph.node:
        if node.op_type not in op_types:
            continue
        twin = after.get(node.name)
        if twin is None or twin.op_type != node.op_type:
            names.append(node.name)
            continue
        feeders = [producers.get(i) for i in twin.input if i]
        if any(p is not None and p.op_type == "DequantizeLinear" for p in feeders):
            names.append(node.name)
        elif twin.op_type == "MatMul" and any(
            i.endswith("_DequantizeLinear_Output") for i in twin.input
        ):
            names.append(node.name)
    return names


def sensitivity(
    fp32: onnx.ModelProto,
    quantized: onnx.ModelProto | None,
    nodes: Sequence[str],
    feeds: Sequence[Feeds],
    scheme: Scheme,
) -> list[tuple[str, float]]:
    """(node name, SQNR in dB) for ``nodes``, lowest (most sensitive) first."""
    by_name = {n.name: n for n in fp32.graph.node}
    inits = {i.name: i for i in fp32.graph.initializer}
    params = _static_params(quantized) if scheme.tier.calibrated and quantized else {}
    weight_nsr: dict[str, float] = {}
    activations: set[str] = set()
    for name in nodes:
        node = by_name[name]
        for index, tensor in enumerate(node.input):
            if not tensor:
                continue
            if tensor in inits:
                if node.op_type in ("Conv", "ConvTranspose", "Gemm") and index == 2:
                    continue  # bias: int32 at the product's scale, negligible error
                if tensor not in weight_nsr:
                    w = numpy_helper.to_array(inits[tensor])
                    if w.dtype.kind != "f":
                        continue
                    q = _qdq_weight(w, _weight_axis(node, index, w.ndim), scheme)
                    weight_nsr[tensor] = _nsr(w.astype(np.float64), q)
            elif scheme.tier.weight_only_bits is None:  # weight-only: activations exact
                activations.add(tensor)
    product_nodes = [by_name[n] for n in nodes if by_name[n].op_type in ("MatMul", "Gemm")]
    act_energy, out_energy = _activation_energy(
        fp32, sorted(activations), feeds, scheme, params, product_nodes, inits
    )
    ranking = []
    for name in nodes:
        node = by_name[name]
        if name in out_energy:  # measured at the output: weights decide what noise matters
            signal, noise = out_energy[name]
            nsr = noise / signal if signal > 0 else (math.inf if noise > 0 else 0.0)
            ranking.append((name, _db(nsr)))
            continue
        nsr = 0.0
        for tensor in node.input:
            if tensor in weight_nsr:
                nsr += weight_nsr[tensor]
            elif tensor in act_energy:
                signal, noise = act_energy[tensor]
                nsr += noise / signal if signal > 0 else (math.inf if noise > 0 else 0.0)
        ranking.append((name, _db(nsr)))
    ranking.sort(key=lambda item: item[1])
    return ranking


def _nsr(x: np.ndarray, q: np.ndarray) -> float:
    signal = float(np.square(x).sum())
    noise = float(np.square(x - q).sum())
    if not math.isfinite(noise):
        return math.inf
    return noise / signal if signal > 0 else (math.inf if noise > 0 else 0.0)


def _db(nsr: float) -> float:
    if nsr <= 0:
        return 200.0  # exact: report a large, finite SQNR (JSON has no inf)
    if not math.isfinite(nsr):
        return -200.0
    return -10.0 * math.log10(nsr)


def _activation_energy(
    fp32: onnx.ModelProto,
    tensors: Sequence[str],
    feeds: Sequence[Feeds],
    scheme: Scheme,
    params: dict[str, tuple[float, int, str]],
    product_nodes: Sequence[onnx.NodeProto] = (),
    inits: Mapping[str, onnx.TensorProto] | None = None,
) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """(tensor -> (signal, noise) energy, product node -> (signal, noise) energy at its output).

    For MatMul/Gemm the node is evaluated twice in numpy, on exact and on quantized inputs:
    an activation's noise only matters through the weights it meets (an outlier channel
    whose weight row is ~0 dominates the input's energy but not the output's).
    """
    if not tensors:
        return {}, {}
    inits = inits or {}
    weights = {
        node.name: {
            i: numpy_helper.to_array(inits[t]).astype(np.float64)
            for i, t in enumerate(node.input)
            if t in inits
        }
        for node in product_nodes
    }
    outputs = {node.name: [0.0, 0.0] for node in product_nodes}
    augmented = copy.deepcopy(fp32)
    existing = {o.name for o in augmented.graph.output}
    graph_inputs = {i.name for i in augmented.graph.input}
    for name in tensors:
        if name not in existing and name not in graph_inputs:
            augmented.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = session(augmented, "disable_all")
    energies = {name: [0.0, 0.0] for name in tensors}
    for feed in feeds:
        values = run(sess, feed)
        values.update({k: v for k, v in feed.items() if k in energies})
        quantized_values: dict[str, np.ndarray] = {}
        for name in tensors:
            x = values.get(name)
            if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
                continue
            x64 = x.astype(np.float64)
            q = _qdq_activation(x64, scheme, params.get(name))
            energies[name][0] += float(np.square(x64).sum())
            energies[name][1] += float(np.square(x64 - q).sum())
            quantized_values[name] = q
        for node in product_nodes:
            exact, noisy = [], []
            for index, tensor in enumerate(node.input[:2]):
                if index in weights[node.name]:
                    w = weights[node.name][index]
                    exact.append(w)
                    noisy.append(_qdq_weight(w, _weight_axis(node, index, w.ndim), scheme))
                elif tensor in quantized_values:
                    exact.append(values[tensor].astype(np.float64))
                    noisy.append(quantized_values[tensor])
                else:
                    break
            if len(exact) != 2:
                outputs.pop(node.name, None)
                continue
            ref, got = _product(node, *exact), _product(node, *noisy)
            if node.name in outputs:
                outputs[node.name][0] += float(np.square(ref).sum())
                outputs[node.name][1] += float(np.square(ref - got).sum())
        del values
    return (
        {name: (s, n) for name, (s, n) in energies.items()},
        {name: (s, n) for name, (s, n) in outputs.items()},
    )


def _product(node: onnx.NodeProto, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if node.op_type == "Gemm":
        attrs = {x.name: x for x in node.attribute}
        if "transA" in attrs and attrs["transA"].i:
            a = a.T
        if "transB" in attrs and attrs["transB"].i:
            b = b.T
    return np.matmul(a, b)
