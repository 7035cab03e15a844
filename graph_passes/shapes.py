"""Value shapes: ONNX inference, the contrib ops' own rules, and ORT's symbolic inference.

Three sources, one module, because every fusion that must prove a shape asks all three:

- ``infer_shapes``: ONNX shape inference, never fatal, declared graph outputs kept.
- ``output_shape`` / ``propagate``: the output shapes of the com.microsoft ops our fusions
  emit, which ONNX inference cannot know. ONNX has no schema for contrib ops, so everything
  downstream of a fused attention or SkipLayerNormalization loses its shape, and a later
  fusion that must prove two tensors have one shape (SkipLayerNormalization's residual Add)
  refuses. The rules are the ops' documented output shapes, in the input's own symbols:

    SkipLayerNormalization, SkipSimplifiedLayerNormalization, BiasGelu, FastGelu, Gelu,
    QuickGelu, BiasAdd                     output 0 = input 0's shape (and the Skip norms'
                                           residual sum, output 3, too)
    Attention (packed QKV, no qkv_hidden_sizes)   [B, S, W / 3]   (W: weights' last dim)
    MultiHeadAttention (3D query)          [B, S, V]  (V: 3D value's last dim, or H * D of a
                                           4D (B, H, T, D) value)
    MatMulNBits                            input 0's shape with the last dim N (attribute)

- ``symbolic_dims``: ONNX Runtime's symbolic shape inference, for what ONNX's own inference
  loses (shapes computed at run time); used by fusions that must prove shapes (SkipLayerNorm's
  residual Add) or need concrete sizes for timing (attention's mask bias).
"""

from __future__ import annotations

import logging
import re

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

logger = logging.getLogger(__name__)

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
    if node.op_type == "MatMulNBits" and first and "N" in node.attributes:
        return ir.Shape([*first[:-1], node.attributes.get_int("N")])
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
    """Set the shapes of contrib nodes' outputs that lack one (see the module docstring);
    returns how many were set."""
    count = 0
    for graph in model.graphs():
        for node in graph:
            outputs = [node.outputs[0]] if node.outputs else []
            if node.op_type.startswith("Skip") and len(node.outputs) > 3:
                outputs.append(node.outputs[3])  # the residual sum: input 0's shape
            for out in outputs:
                if out is None or out.shape is not None:
                    continue
                shape = output_shape(node)
                if shape is not None:
                    out.shape = shape
                    if out.type is None:  # every op here returns its first input's dtype
                        out.type = node.inputs[0].type
                    count += 1
    return count


def infer_shapes(model: ir.Model, *, refresh: bool = False) -> None:
    """Fill in value types and shapes with ONNX shape inference, in place and never fatal.

    Non-strict, so models with custom ops get what can be inferred. Declared graph-output
    types and shapes are kept as they were: they are the model's contract with its caller.

    ``refresh``: forget every intermediate shape first and infer again from the inputs,
    alternating ONNX inference with the contrib ops' own shape rules (``propagate``) until
    nothing new is learned. ONNX inference keeps a shape a value already has, so after a
    rewrite the nodes downstream would keep stale ``unk__`` symbols and no two of them could
    be proven equal.
    """
    if refresh:
        for graph in model.graphs():
            for node in graph:
                for value in node.outputs:
                    if not value.is_graph_output():
                        value.shape = None
        for _ in range(64):  # each round crosses at least one more contrib node
            _onnx_inference(model)
            if not propagate(model):
                return
        return
    _onnx_inference(model)


def _onnx_inference(model: ir.Model) -> None:
    outputs = [(v, v.type, v.shape) for g in model.graphs() for v in g.outputs]
    try:
        common_passes.ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    except ir.serde.SerdeError:  # inferred types onnx-ir cannot hold (maps): go without
        logger.debug("shape inference result not representable; shapes left as they were")
    for value, type_, shape in outputs:
        if type_ is not None:
            value.type = type_
        if shape is not None:
            value.shape = shape


Dims = tuple[int | str | None, ...]


_CLAMP = re.compile(r"^Min\(\s*(?:(\d+)\s*,\s*(\w+)|(\w+)\s*,\s*(\d+))\s*\)$")


def clamped_to(dim: object, other: object) -> bool:
    """Whether ``dim`` is ``Min(k, other)`` (k >= 2, ``other`` a symbol): how ORT's symbolic
    inference writes a Slice ``buffer[:, :S]`` of a fixed-size buffer (BERT's position ids).

    An operand of a broadcasting Add with such a dim against ``other`` *is* ``other`` wherever
    the model runs: for ``other <= k`` the two are equal, and for ``other > k`` they differ and
    neither is 1, so the original Add fails at run time too.
    """
    if not isinstance(dim, str) or not isinstance(other, str):
        return False
    found = _CLAMP.match(dim.strip())
    if found is None:
        return False
    k, symbol = (found[1], found[2]) if found[1] else (found[4], found[3])
    return int(k) >= 2 and symbol == other


def _clamp_aware(base: type) -> type:
    """ORT's SymbolicShapeInference with one more broadcast fact: ``Min(k, S)`` against
    ``S`` broadcasts to ``S`` (``clamped_to`` says why that is sound). Without
    it, ORT's inference stops at the first such broadcast (the embedding sum of a BERT
    exported by torch's legacy exporter) and proves no shape at all."""

    class ClampAware(base):
        def _broadcast_shapes(self, shape1, shape2):
            shape1, shape2 = list(shape1), list(shape2)
            for i in range(1, min(len(shape1), len(shape2)) + 1):
                a, b = str(shape1[-i]), str(shape2[-i])
                if clamped_to(a, b):
                    shape1[-i] = shape2[-i]
                elif clamped_to(b, a):
                    shape2[-i] = shape1[-i]
            return super()._broadcast_shapes(shape1, shape2)

    return ClampAware


def symbolic_dims(model: ir.Model) -> dict[str, Dims]:
    """Shapes from ONNX Runtime's symbolic shape inference, by value name ({} on failure).

    ONNX's own inference gives up on shapes computed at run time (``Reshape(x,
    Concat(Shape(x)[0], ...))`` after attention) and names each unknown dim afresh, so a
    residual ``Add([B, S, C], [B, unk, C])`` cannot be proven shape-preserving. ORT's
    symbolic inference follows the shape arithmetic. It runs with ``auto_merge=False``: it
    never assumes two unknown dims equal (with merging on it would, which proves nothing).
    Big weights are given to it as inputs of their shape: it only reads small shape tensors.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # Weights become graph inputs of their type and shape on a clone (which shares the
        # tensors): nothing is copied or read but the small shape constants.
        work = model.clone()
        for name, value in list(work.graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or tensor.nbytes > 1024:
                del work.graph.initializers[name]
                if not value.is_graph_input():
                    work.graph.inputs.append(value)
        proto = ir.to_proto(work)
        del proto.graph.value_info[:]  # its own inference, not ONNX's fresh unk__ symbols
        # ORT's static ``infer_shapes`` throws the partial result away (and saves
        # "sym_shape_infer_temp.onnx" into the working directory) when one value stays
        # unknown; its steps are driven here instead so every proven shape is kept.
        inference = _clamp_aware(SymbolicShapeInference)(2**31 - 1, False, False, 0)
        inference._preprocess(proto)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        inferred = inference.out_mp_
    except Exception as exc:  # noqa: BLE001 - any failure just means no extra shape facts
        logger.debug("symbolic shape inference failed: %s", exc)
        return {}
    found: dict[str, Dims] = {}
    graph = inferred.graph
    for info in (*graph.value_info, *graph.input, *graph.output):
        kind = info.type.WhichOneof("value")
        if kind != "tensor_type" or not info.type.tensor_type.HasField("shape"):
            continue
        dims = []
        for d in info.type.tensor_type.shape.dim:
            which = d.WhichOneof("value")
            dims.append(d.dim_value if which == "dim_value" else (d.dim_param or None))
        found[info.name] = tuple(dims)
    return found
