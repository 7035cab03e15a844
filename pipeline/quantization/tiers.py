"""One function per precision tier, each a thin, explicit call into ONNX Runtime's tools.

Every function reads a prepared fp32 model from a path and writes the lowered model to
another path; none decides whether the result is good (``guard`` does, by measurement).

* ``int8_dynamic``: ``quantize_dynamic`` (QOperator: ``DynamicQuantizeLinear`` +
  ``MatMulInteger``/``ConvInteger``, fused by ORT into ``DynamicQuantizeMatMul``); weights
  int8 (symmetric by default), per-channel optional, activations uint8 scaled per run.
* ``int8_static``: calibration (MinMax / Entropy / Percentile) through ORT's calibrators,
  written to ORT's JSON calibration cache, then ``quantize_static`` in QDQ (default) or
  QOperator format reading that cache. Calibrating separately lets us calibrate a copy with
  clamped mask constants (see ``preprocess``) while quantizing the untouched model.
* ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with
  ``keep_io_types`` and an op block list, then ``remove_redundant_casts``.
* ``int4``: ``MatMulNBitsQuantizer`` (weight-only ``MatMulNBits``): RTN (ORT's native
  blockwise round-to-nearest, ``DefaultWeightOnlyQuantConfig``), HQQ, or GPTQ with
  calibration data.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tier:
    """One precision tier, as data: what the stage and the guard branch on.

    Adding a tier is one row here plus its lowering function below; nothing compares tier
    names.
    """

    name: str
    default_drop: float  # the budget on the metric's drop when the user gives none
    lowers: bool = True  # fp32 is the tier that changes nothing
    int8: bool = False  # int8 types from the CPU's ISA, opset raised, shapes inferred
    calibrated: bool = False  # static activation ranges: needs calibration data
    half: bool = False  # float16 weights and activations
    weight_only_bits: int | None = None  # weights only, blockwise (MatMulNBits): 4
    slow_on_cpu: bool = False  # ORT's CPU provider has few kernels for it: warn
    auto_on_cpu: bool = True  # built and measured by ``--precision auto`` on CPU


TIERS: dict[str, Tier] = {
    t.name: t
    for t in (
        # in the order ``auto`` tries them
        Tier("fp32", 0.0, lowers=False, auto_on_cpu=False),
        Tier("int8-dynamic", 0.01, int8=True),
        Tier("int8-static", 0.01, int8=True, calibrated=True),
        # int4 weight-only is only worth it where MatMulNBits kernels are fast (decoders with
        # big weights); HQQ int4 measured 3.5x SLOWER than fp32 on CPU, so it is a candidate
        # like any other: built, measured, and chosen only when faster within budget.
        Tier("int4", 0.02, weight_only_bits=4),
        # int8 weight-only: MatMulNBits with symmetric 8-bit blocks (int4_affine's); a
        # quarter of fp32's weight bytes with activations kept float, for models bound by
        # weight bandwidth (decoders at batch 1) where int4 loses too much.
        Tier("int8-weight-only", 0.01, weight_only_bits=8),
        Tier("fp16", 1e-3, half=True, slow_on_cpu=True, auto_on_cpu=False),
    )
}

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# Weight-bearing ops: where int8 pays (int8 GEMM/conv kernels) and where the error budget is
# well spent. Element-wise ops are left float by default: in a transformer, quantizing the
# Add that applies the attention mask would put -1e4 and the scores on one int8 scale.
WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Cheap ops ORT fuses into QLinearConv chains in CNNs (no Softmax in the graph).
CNN_EXTRA_OPS = ("Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Add", "Concat")
MAX_INTERMEDIATE_OUTPUTS = 16
# The element type ORT's quantizer assumes for a tensor whose type shape inference could not
# find. Behind a com.microsoft op (our fused Attention / SkipLayerNormalization) ONNX's
# inference knows no schema, and without this option quantize_dynamic/static stop with
# "Unable to find data type for weight_name=...". Every tensor we quantize is float32, so the
# default is right wherever it is used, and it is never consulted when the type is known.
DEFAULT_TYPE_OPTION = {"DefaultTensorType": onnx.TensorProto.FLOAT}
_TWO_GB = 2**31 - 1


def default_op_types(model: onnx.ModelProto, static: bool, exclude: Sequence[str]) -> list[str]:
    """Op types to quantize: weight ops, plus CNN glue ops for static models without Softmax,
    plus the fused ``com.microsoft`` Attention for dynamic int8.

    Attention carries the packed Q/K/V weight of its layer; left float, a fused transformer
    keeps a quarter of its weight FLOPs in fp32 (MiniLM b1 s128 on a VNNI CPU: 0.84x fp32
    latency with MatMuls only, 0.60x with ``QAttention``, which takes the fused node's raw
    2D mask as it is). ORT quantizes Attention dynamically only.
    """
    ops = list(WEIGHT_OPS)
    types = {n.op_type for n in model.graph.node}
    if static and "Softmax" not in types and "Conv" in types:
        ops += CNN_EXTRA_OPS
    if not static and any(is_contrib_attention(n) for n in model.graph.node):
        ops.append("Attention")
    return [op for op in ops if op not in set(exclude)]


def is_contrib_attention(node: onnx.NodeProto) -> bool:
    """ORT's fused ``com.microsoft`` Attention (not ONNX's own Attention-23, which has no
    weights inside and which ORT's quantizer must not take for it)."""
    return node.op_type == "Attention" and node.domain == "com.microsoft"


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose two inputs are both activations (attention's Q.K^T and P.V).

    Static QDQ would quantize them (``MatMulConstBOnly`` only applies to dynamic): two
    per-tensor activation scales on the attention scores cost accuracy for little speed."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]


def _large(model_path: Path) -> bool:
    return model_path.stat().st_size > _TWO_GB or any(
        p.suffix == ".data" for p in model_path.parent.iterdir()
    )


def int8_dynamic(
    model_path: Path,
    out_path: Path,
    *,
    op_types: Sequence[str],
    per_channel: bool,
    reduce_range: bool,
    symmetric_weights: bool,
    exclude_nodes: Sequence[str],
) -> None:
    quantize_dynamic(
        model_path,
        out_path,
        op_types_to_quantize=list(op_types),
        per_channel=per_channel,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude_nodes),
        use_external_data_format=_large(model_path),
        extra_options={
            "WeightSymmetric": symmetric_weights,
            "MatMulConstBOnly": True,
            **DEFAULT_TYPE_OPTION,
        },
    )


def calibrate(
    calibration_model: Path,
    cache_path: Path,
    reader: CalibrationDataReader,
    *,
    method: str,
    op_types: Sequence[str],
) -> None:
    """Run ORT's calibrator over ``reader`` and write the ranges to ORT's JSON cache.

    MinMax memory is bounded by feeding ORT ``MAX_INTERMEDIATE_OUTPUTS`` sets per
    ``collect_data`` call (each call reduces its sets to ranges and merges them), NOT with
    ORT's ``max_intermediate_outputs`` option: ORT 1.2x's MinMax calibrator discards the sets
    it has gathered when that limit is reached without reducing them first, so with exactly
    16 sets it raises "No data is collected." and with 20 it silently calibrates on the last 4.
    Readers without ``set_range`` are read in one call.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="ovo-calib-") as tmp:
        calibrator = create_calibrator(
            calibration_model,
            list(op_types),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CALIBRATION_METHODS[method],
            use_external_data_format=_large(calibration_model),
            providers=["CPUExecutionProvider"],
        )
        total = len(reader) if hasattr(reader, "__len__") else 0
        if method == "minmax" and hasattr(reader, "set_range") and total:
            for start in range(0, total, MAX_INTERMEDIATE_OUTPUTS):
                reader.set_range(start, start + MAX_INTERMEDIATE_OUTPUTS)
                calibrator.collect_data(reader)
        else:
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_data(ranges, cache_path)


def int8_static(
    model_path: Path,
    out_path: Path,
    *,
    cache_path: Path,
    method: str,
    op_types: Sequence[str],
    per_channel: bool,
    reduce_range: bool,
    activation_type: str,
    symmetric_weights: bool,
    exclude_nodes: Sequence[str],
    quant_format: str = "qdq",
) -> None:
    """Quantize with ranges read from ``cache_path`` (written by ``calibrate``)."""
    quantize_static(
        model_path,
        out_path,
        None,
        quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
        op_types_to_quantize=list(op_types),
        per_channel=per_channel,
        reduce_range=reduce_range,
        activation_type=QUANT_TYPES[activation_type],
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude_nodes),
        use_external_data_format=_large(model_path),
        calibrate_method=CALIBRATION_METHODS[method],
        calibration_cache_path=cache_path,
        extra_options={
            "WeightSymmetric": symmetric_weights,
            # int8 activations must be symmetric for S8S8 kernels to avoid a zero-point shift
            "ActivationSymmetric": activation_type == "int8",
            # Measured on MiniLM (real sentences, pooled cosine to fp32): re-quantizing every
            # MatMul output to uint8, which dynamic int8 never does, cost 0.948 -> 0.990; a
            # QDQ pair shared with the residual Add quantized the residual stream (+0.0007).
            "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
            "DedicatedQDQPair": True,
            **DEFAULT_TYPE_OPTION,
        },
    )


def fp16(
    model: onnx.ModelProto,
    *,
    keep_io_types: bool,
    op_block_list: Sequence[str],
    node_block_list: Sequence[str],
) -> tuple[onnx.ModelProto, int]:
    """fp16 weights and compute; returns the model and how many Cast pairs were removed."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converted = convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list)),
        node_block_list=list(node_block_list),
        disable_shape_infer=False,
    )
    removed = remove_redundant_casts(converted.graph)
    return converted, removed


_WIDER = {
    (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT),
    (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE),
    (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE),
    (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT),
}


def remove_redundant_casts(graph: onnx.GraphProto) -> int:
    """Remove ``Cast(to=B)`` of ``Cast(to=A)`` of a B tensor when A is wider than B.

    Widening then narrowing back is exact (every fp16 value is a float32 value), so the
    pair is an identity. The reverse (fp32 -> fp16 -> fp32) rounds and is kept. The middle
    tensor must feed only the second Cast and not be a graph output. Returns pairs removed.
    """
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    elem_types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.input, *graph.value_info, *graph.output]
    }
    elem_types.update({i.name: i.data_type for i in graph.initializer})
    for node in graph.node:
        if node.op_type == "Cast":
            elem_types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")

    dead: set[int] = set()
    rename: dict[str, str] = {}
    for second in graph.node:
        if second.op_type != "Cast" or second.domain not in ("", "ai.onnx"):
            continue
        first = producers.get(second.input[0])
        if first is None or first.op_type != "Cast" or id(first) in dead:
            continue
        source = first.input[0]
        narrow, wide = elem_types.get(source), elem_types.get(first.output[0])
        if narrow is None or elem_types.get(second.output[0]) != narrow:
            continue
        if (narrow, wide) not in _WIDER:
            continue
        middle = first.output[0]
        if middle in graph_outputs or len(consumers.get(middle, [])) != 1:
            continue
        if second.output[0] in graph_outputs:
            continue  # the output name must survive; keeping one Cast pair is cheap
        rename[second.output[0]] = source
        dead.update({id(first), id(second)})
    if not dead:
        return 0
    kept = [n for n in graph.node if id(n) not in dead]
    for node in kept:
        for index, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[index] = name
    del graph.node[:]
    graph.node.extend(kept)
    return len(dead) // 2


# MatMulNBits computes with int8 activations (per block) at accuracy_level 4, the fast
# kernel; the offsets keep grid weights (to their own rounding), so the activation rounding
# is what is left (SmolLM2-135M: perplexity +0.7%, docs/benchmarks.md).
AFFINE_ACCURACY_LEVEL = 4


def int8_weight_only(
    model: onnx.ModelProto,
    *,
    block_size: int,
    exclude_nodes: Sequence[str],
    weights_dir: Path | None = None,
) -> onnx.ModelProto:
    """Weight-only 8-bit ``MatMulNBits`` (symmetric blocks) for MatMuls with constant weights;
    ``weights_dir`` as in ``int4_affine.lower``."""
    from pipeline.quantization import int4_affine

    every = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    lowered, _ = int4_affine.lower(
        model,
        block_size=block_size,
        accuracy_level=AFFINE_ACCURACY_LEVEL,
        exclude_nodes=exclude_nodes,
        eight_bit_nodes=every,
        weights_dir=weights_dir,
    )
    return lowered


def int4(
    model: onnx.ModelProto,
    *,
    block_size: int,
    algorithm: str,
    symmetric: bool,
    exclude_nodes: Sequence[str],
    reader: CalibrationDataReader | None,
    weights_dir: Path | None = None,
) -> onnx.ModelProto:
    """Weight-only 4-bit ``MatMulNBits`` for MatMuls with constant weights; ``model`` may come
    without its external data from ``weights_dir`` (``affine`` reads one weight at a time,
    ORT's quantizers get them all loaded)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if algorithm == "affine":
        from pipeline.quantization import int4_affine

        lowered, _ = int4_affine.lower(
            model,
            block_size=block_size,
            accuracy_level=AFFINE_ACCURACY_LEVEL,
            exclude_nodes=exclude_nodes,
            eight_bit_nodes=int4_affine.output_projections(model),
            weights_dir=weights_dir,
        )
        return lowered
    if weights_dir is not None:
        onnx.load_external_data_for_model(model, str(weights_dir))
    if algorithm == "rtn":
        config = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=symmetric, op_types_to_quantize=("MatMul",)
        )
    elif algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block_size, op_types_to_quantize=("MatMul",))
    elif algorithm == "gptq":
        if reader is None:
            raise ValueError("int4 gptq needs calibration data")
        config = GPTQWeightOnlyQuantConfig(
            calibration_data_reader=reader, block_size=block_size, op_types_to_quantize=("MatMul",)
        )
    else:
        raise ValueError(f"unknown int4 algorithm {algorithm!r}")
    quantizer = MatMulNBitsQuantizer(
        model,
        block_size=block_size,
        is_symmetric=symmetric,
        nodes_to_exclude=list(exclude_nodes),
        algo_config=config,
    )
    quantizer.process()
    return quantizer.model.model
