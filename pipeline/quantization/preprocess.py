"""Make a model quantizable: opset >= 13, shapes known, no calibration-breaking constants.

Three failures of ONNX Runtime's quantizer that this module exists to prevent:

1. **Per-channel QDQ on opset < 13.** ``DequantizeLinear`` gained its ``axis`` attribute in
   opset 13; on an opset-12 model (Paddle exports many) ORT still writes per-channel
   ``DequantizeLinear`` nodes with ``axis`` and the result fails the checker. So int8 tiers
   raise the opset to 13 first, with ONNX's version converter; when that converter cannot
   handle the model (contrib ops), the opset import alone is bumped, but only when every
   default-domain op in the graph has the same schema at both versions (then nothing changes
   in meaning).
2. **Unknown shapes.** The quantizer skips tensors whose shape it cannot see, and on a fused
   model (``com.microsoft`` ops from our passes or ORT's) plain ONNX shape inference stops at
   the first contrib op. ORT's ``quant_pre_process`` runs ORT's symbolic shape inference
   (which knows the contrib ops) and then ONNX's; its graph optimizer is skipped because our
   own verified passes already ran and an unverified rewrite here would defeat them.
3. **float-min / -inf mask constants.** Exporters write attention masks as
   ``Where(mask, -3.4e38, scores)`` or ``(1 - mask) * float32.min``. A histogram calibrator
   (Entropy, Percentile) builds 128 bins over ``[-max|x|, max|x|]``; with ``|x| = 3.4e38``
   numpy cannot make finite bins and raises "Too many bins for data range". For calibration
   only, such constants are clamped to +-1e4 (``exp(-1e4)`` is 0 in float32, so the softmax
   is unchanged); the shipped model keeps its original constants.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.runtime.proto_size import fits_one_message

logger = logging.getLogger(__name__)

MIN_QDQ_OPSET = 13
MASK_LIMIT = 1e30  # constants at or beyond this magnitude (or infinite) are mask sentinels
MASK_CLAMP = 1e4


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset (0 when it imports none)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def _schemas_unchanged(model: onnx.ModelProto, old: int, new: int) -> list[str]:
    """Default-domain op types whose schema differs between opsets ``old`` and ``new``."""
    changed = set()
    for node in _all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            before = onnx.defs.get_schema(node.op_type, old, "").since_version
            after = onnx.defs.get_schema(node.op_type, new, "").since_version
        except onnx.defs.SchemaError:
            changed.add(node.op_type)
            continue
        if before != after:
            changed.add(node.op_type)
    return sorted(changed)


def raise_opset(
    model: onnx.ModelProto, minimum: int = MIN_QDQ_OPSET
) -> tuple[onnx.ModelProto, str]:
    """Return ``model`` at ai.onnx opset >= ``minimum`` and a note ('' when nothing changed).

    Raises:
        ValueError: the opset cannot be raised without changing the model's meaning.
    """
    current = default_opset(model)
    if current >= minimum:
        return model, ""
    try:
        converted = onnx.version_converter.convert_version(model, minimum)
        onnx.checker.check_model(converted)
        return converted, f"opset raised {current} -> {minimum} (ONNX version converter)"
    except Exception as exc:  # the converter rejects contrib ops and some old patterns
        reason = " ".join(str(exc).split())[:200]
    changed = _schemas_unchanged(model, current, minimum)
    if changed:
        raise ValueError(
            f"cannot raise opset {current} -> {minimum} for per-channel QDQ: the version "
            f"converter failed ({reason}) and ops {', '.join(changed)} change meaning between "
            "the two; use --no-per-channel or convert the model first"
        )
    bumped = copy.deepcopy(model)
    for entry in bumped.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = minimum
    return bumped, (
        f"opset import raised {current} -> {minimum} (no op in the graph changes schema "
        f"between them; the version converter failed: {reason})"
    )


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Symbolic (contrib-aware) then ONNX shape inference; a failure is a note, not an error."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    large = not fits_one_message(model)
    with tempfile.TemporaryDirectory(prefix="ovo-quant-pre-") as tmp:
        target = Path(tmp) / "pre.onnx"
        attempts = (
            {"skip_symbolic_shape": False, "auto_merge": True, "guess_output_rank": True},
            {"skip_symbolic_shape": True},
        )
        errors = []
        for kwargs in attempts:
            try:
                # ORT's symbolic inference saves "sym_shape_infer_temp.onnx" into the working
                # directory when it gives up: keep that debris inside the scratch folder.
                with contextlib.chdir(tmp):
                    quant_pre_process(
                        copy.deepcopy(model),
                        target,
                        skip_optimization=True,
                        save_as_external_data=large,
                        **kwargs,
                    )
                result = onnx.load(str(target))
                note = "" if not errors else f"symbolic shape inference failed: {errors[0]}"
                return result, note
            except Exception as exc:  # shape inference is best effort by design
                errors.append(" ".join(str(exc).split())[:200])
                logger.debug("quant_pre_process %s failed: %s", kwargs, exc)
    return model, f"shape inference failed, quantizing without it: {errors[-1]}"


def clamp_mask_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy with +-inf / |x| >= 1e30 float constants clamped to +-1e4, and their names.

    Only float initializers and ``Constant`` nodes are touched; NaN is left alone (it is a
    bug in the model, not a mask).
    """
    clamped = copy.deepcopy(model)
    names: list[str] = []

    def fix(tensor: onnx.TensorProto, name: str) -> None:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            return
        if tensor.data_location == onnx.TensorProto.EXTERNAL or np.prod(tensor.dims) > 1 << 20:
            return  # masks are small; big weights are never sentinels
        array = numpy_helper.to_array(tensor)
        extreme = np.isinf(array) | (np.abs(np.nan_to_num(array)) >= MASK_LIMIT)
        if not extreme.any():
            return
        fixed = np.where(extreme, np.sign(array) * MASK_CLAMP, array).astype(array.dtype)
        tensor.CopyFrom(numpy_helper.from_array(fixed, tensor.name))
        names.append(name)

    def walk(graph: onnx.GraphProto) -> None:
        for init in graph.initializer:
            fix(init, init.name)
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.name == "value":
                    fix(attr.t, node.output[0])
                elif attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        walk(sub)

    walk(clamped.graph)
    return clamped, names


def lift_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Turn ``Constant`` nodes into initializers; returns the model and how many were lifted.

    ORT's quantizer finds weights and biases only among initializers: a Conv whose weight is a
    ``Constant`` node (Paddle exports at opset 12 write every weight that way) stops
    ``quantize_dynamic`` with "Expected conv2d_394.w_0 to be an initializer", and the QOperator
    path crashes on a Conv bias held in a Constant. ORT itself turns Constants into
    initializers at load time, so lifting changes nothing in meaning. The rewrite is
    ``graph_passes.cleanup.lift_constants.LiftConstants`` (onnx-ir's pass, with Constants that are
    graph outputs and IR < 4 models left alone).
    """
    if not any(n.op_type == "Constant" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model, 0
    import onnx_ir as ir

    from graph_passes.cleanup.lift_constants import LiftConstants

    ir_model = ir.from_proto(model)
    lifter = LiftConstants()
    lifter(ir_model)
    return ir.to_proto(ir_model), lifter.matches


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def lower_gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite ``Gemm(A, B, C)`` with constant B (and C) as ``MatMul(A, B') + C``.

    ORT's ``MatMulNBitsQuantizer`` (int4) only quantizes ``MatMul``; GPT-2's projections are
    exported as ``Gemm`` (transformers' ``Conv1D``), so without this only 1 of GPT-2's 17
    weights becomes 4-bit. Before::

        y = Gemm<transB=t>(a, B, c)          # a[M, K], B[K, N] (or [N, K] when t = 1)

    After::

        m = MatMul(a, B')                    # B' = B (t = 0) or B^T (t = 1), a new initializer
        y = Add(m, c)                        # no Add when Gemm has no C

    ``Gemm`` computes ``alpha * A' @ B' + beta * C``; only ``alpha = beta = 1`` and
    ``transA = 0`` are lowered (other forms would need extra Mul/Transpose nodes and are not
    what exporters write for linear layers). B must be an initializer (a weight); C, when
    present, an initializer or any tensor (Add broadcasts it like Gemm's unidirectional
    broadcast of C to [M, N]). Returns the model (modified in place) and how many Gemms
    were lowered.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {i.name for i in graph.input} | {n.name for n in graph.node}

    def fresh(base: str) -> str:
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    nodes: list[onnx.NodeProto] = []
    transposed: set[str] = set()
    lowered = 0
    for node in graph.node:
        if (
            node.op_type != "Gemm"
            or node.domain not in ("", "ai.onnx")
            or len(node.input) < 2
            or node.input[1] not in inits
            or _attr(node, "transA", 0) != 0
            or _attr(node, "alpha", 1.0) != 1.0
            or _attr(node, "beta", 1.0) != 1.0
        ):
            nodes.append(node)
            continue
        weight = inits[node.input[1]]
        if _attr(node, "transB", 0):
            array = numpy_helper.to_array(weight).T.copy()
            b_name = fresh(weight.name + "_transposed")
            graph.initializer.append(numpy_helper.from_array(array, b_name))
            transposed.add(weight.name)
        else:
            b_name = weight.name
        base = node.name or f"gemm_{lowered}"
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = fresh(node.output[0] + "_matmul") if has_bias else node.output[0]
        nodes.append(
            onnx.helper.make_node(
                "MatMul", [node.input[0], b_name], [product], name=fresh(base + "_MatMul")
            )
        )
        if has_bias:
            nodes.append(
                onnx.helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=fresh(base + "_Add")
                )
            )
        lowered += 1
    if lowered:
        del graph.node[:]
        graph.node.extend(nodes)
        # Transposed weights left without readers would be dead weight in the int4 model.
        used = {i for n in _all_nodes(graph) for i in n.input} | _output_names(graph)
        kept = [i for i in graph.initializer if i.name in used or i.name not in transposed]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return model, lowered


def _output_names(graph: onnx.GraphProto) -> set[str]:
    return {o.name for o in graph.output}
