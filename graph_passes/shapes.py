"""Value shapes: ONNX inference, the contrib ops' own rules, and ORT's symbolic inference.

Three sources, one module, because every fusion that must prove a shape asks all three:

- ``infer_shapes``: ONNX shape inference, never fatal, declared graph outputs kept, plus
  what ONNX's data propagation misses (``refine``, on ``shape_entries``). ONNX has no
  data-propagation rule for ``Reshape``, and the dynamo exporter without its optimizer reads
  every size as ``Reshape(Squeeze(Shape(x)[i:i+1]), [-1])``; ONNX also gives up on every
  axis of a ``Slice`` with a computed end, and does not know that ``Min(k, S)`` broadcast
  against ``S`` is ``S``. A BERT exported that way without ``token_type_ids`` expands its
  buffered ids to ``[batch, sequence]`` and slices its position ids to the sequence: ONNX
  made both ``[unk__, unk__]``, its hidden states lost ``batch`` and ``sequence``, and
  attention's head split and merge, which read them from the mask, could not be proven.
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
import math
import re
from collections import Counter, deque

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes.base import constant_array, is_standard

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
    After each ONNX round, ``refine`` adds the dims ONNX could not see (shape vectors it
    does not follow); the values this call filled in downstream of a refined one are then
    inferred again from it.

    ``refresh``: forget every intermediate shape first and infer again from the inputs,
    alternating ONNX inference with the contrib ops' own shape rules (``propagate``) until
    nothing new is learned. ONNX inference keeps a shape a value already has, so after a
    rewrite the nodes downstream would keep stale ``unk__`` symbols and no two of them could
    be proven equal.
    """
    last = model.meta.get(_INFERRED)
    if last is not None and last[0] == _fingerprint(model) and (last[1] or not refresh):
        return  # nothing it reads changed since a call at least as thorough: nothing to find
    if refresh:
        for graph in model.graphs():
            for node in graph:
                for value in node.outputs:
                    if not value.is_graph_output():
                        value.shape = None
    blank = {  # what this call fills in (all intermediates when refreshing)
        value
        for graph in model.graphs()
        for node in graph
        for value in node.outputs
        if value.shape is None and not value.is_graph_output()
    }
    for _ in range(64):  # each round crosses one more contrib node or refined shape
        _onnx_inference(model)
        refined = refine(model)
        _forget_downstream(refined, blank)
        crossed = propagate(model) if refresh else 0
        if not refined and not crossed:
            break
    model.meta[_INFERRED] = (_fingerprint(model), refresh)


# model.meta key: (the fingerprint last inferred, whether that call refreshed)
_INFERRED = "graph_passes.shapes.inferred"


def _fingerprint(model: ir.Model) -> tuple:
    """What shape inference reads, cheaply: the opsets, each graph's inputs with their shapes,
    each node (op, attributes' identity, input and output values) and which outputs still
    lack a shape. Most passes change nothing, and each of them asks for shapes; an
    unchanged fingerprint spares a whole inference (several ONNX rounds with ``refine``)."""
    parts: list = [tuple(sorted(model.opset_imports.items()))]
    for graph in model.graphs():
        parts.append(tuple((id(v), str(v.shape)) for v in graph.inputs))
        for node in graph:
            parts.append(
                (
                    id(node),
                    node.op_type,
                    tuple(id(a) for a in node.attributes.values()),
                    tuple(id(v) for v in node.inputs),
                    tuple((id(v), v.shape is None) for v in node.outputs),
                )
            )
    return tuple(parts)


def _forget_downstream(values: list[ir.Value], blank: set[ir.Value]) -> None:
    """Drop the shapes in ``blank`` that were inferred from ``values``, for another round."""
    seen = set(values)
    queue = deque(values)
    while queue:
        for use in queue.popleft().uses():
            for out in use.node.outputs:
                if out not in seen:
                    seen.add(out)
                    queue.append(out)
                    if out in blank:
                        out.shape = None


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


# -- shape vectors ---------------------------------------------------------------------

SHAPE_OPS = ("Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Reshape")
GENERATED = "unk__"  # the prefix of the symbols ONNX inference makes up for unknown dims

Dim = int | str | None  # a static size, a symbolic dim's name, or unknown


def shape_entries(value: ir.Value | None) -> list[tuple] | None:
    """A 1-D int64 shape vector as entries ("int", k) or ("dim", tensor, axis), else None.

    Understands constants and the shape arithmetic exporters emit: ``Shape`` (with
    start/end), ``Gather``/``Slice`` with constant indices, ``Unsqueeze``/``Squeeze`` of
    scalars, ``Reshape`` of one element to ``[-1]``/``[1]``, ``Concat`` and ``Cast`` (ONNX's
    own data propagation stops at the ``Reshape``).
    """
    if value is None:
        return None
    array = constant_array(value)
    if array is not None:
        if array.dtype.kind not in "iu" or array.ndim > 1:
            return None
        return [("int", int(v)) for v in array.reshape(-1)]
    node = value.producer()
    if node is None or node.op_type not in SHAPE_OPS or not is_standard(node):
        return None
    op = node.op_type
    if op == "Shape":
        data = node.inputs[0]
        if data is None or data.shape is None:
            return None
        rank = len(data.shape)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        return [("dim", data, i) for i in range(rank)[slice(start, end)]]
    if op == "Cast":
        return shape_entries(node.inputs[0])
    if op in ("Unsqueeze", "Squeeze"):  # of a scalar or a 1-element vector: same entries
        inner = shape_entries(node.inputs[0])
        return inner if inner is not None and len(inner) == 1 else None
    if op == "Reshape":  # a scalar or 1-element vector to [-1] / [1] (dynamo's sym_size)
        target = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if target is None or target.reshape(-1).tolist() not in ([-1], [1]):
            return None
        inner = shape_entries(node.inputs[0])
        return inner if inner is not None and len(inner) == 1 else None
    if op == "Concat":
        if node.attributes.get_int("axis", 0) not in (0, -1):
            return None
        out: list[tuple] = []
        for part in node.inputs:
            entries = shape_entries(part)
            if entries is None:
                return None
            out.extend(entries)
        return out
    source = shape_entries(node.inputs[0])
    if source is None:
        return None
    if op == "Gather":
        index = constant_array(node.inputs[1])
        if index is None or node.attributes.get_int("axis", 0) != 0 or index.ndim > 1:
            return None
        try:
            return [source[int(i)] for i in index.reshape(-1)]
        except IndexError:
            return None
    if len(node.inputs) < 3:  # Slice-1 keeps its parameters in attributes
        return None
    starts, ends = constant_array(node.inputs[1]), constant_array(node.inputs[2])
    axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = constant_array(node.inputs[4]) if len(node.inputs) > 4 else None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if axes is not None and int(axes.reshape(-1)[0]) not in (0, -1):
        return None
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        return None
    n = len(source)
    start, end = (int(np.clip(int(v.reshape(-1)[0]), -n - 1, n + 1)) for v in (starts, ends))
    return source[slice(start, end)]


def dim_of(value: ir.Value, axis: int) -> Dim:
    """Axis ``axis`` of ``value``: its size, its symbol's name, or None."""
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    if isinstance(dim, int):
        return dim if dim >= 0 else None
    name = getattr(dim, "value", None)
    return name if isinstance(name, str) and name else None


def shape_value(value: ir.Value | None) -> list[Dim] | None:
    """The entries of a shape vector as dims (``shape_entries`` resolved), else None."""
    entries = shape_entries(value)
    if entries is None:
        return None
    dims: list[Dim] = []
    for entry in entries:
        if entry[0] == "int":
            dims.append(entry[1])
        elif entry[0] == "dim":
            dims.append(dim_of(entry[1], entry[2]))
        else:
            dims.append(None)
    return dims


def _quotient(numerator: list[Dim] | None, denominator: list[Dim]) -> Dim:
    """``prod(numerator) / prod(denominator)`` as a dim: an int, or the one symbol left when
    the denominator's symbols cancel all but one of the numerator's; None when unknown."""
    if numerator is None or None in numerator or None in denominator:
        return None
    top = math.prod(d for d in numerator if isinstance(d, int))
    bottom = math.prod(d for d in denominator if isinstance(d, int))
    top_syms = Counter(d for d in numerator if isinstance(d, str))
    bottom_syms = Counter(d for d in denominator if isinstance(d, str))
    if bottom == 0 or top % bottom or bottom_syms - top_syms:
        return None
    rest = list((top_syms - bottom_syms).elements())
    if not rest:
        return top // bottom
    return rest[0] if len(rest) == 1 and top == bottom else None


def _reshaped(data: list[Dim] | None, target: list[Dim], allowzero: bool) -> list[Dim] | None:
    """``Reshape(data, target)``'s dims: 0 copies (unless ``allowzero``), -1 takes the rest."""
    out: list[Dim | str] = []
    for i, dim in enumerate(target):
        if dim == 0 and not allowzero:
            out.append(data[i] if data is not None and i < len(data) else None)
        elif dim == -1:
            out.append("-1")  # placeholder: no symbol is named "-1"
        elif _negative(dim):
            return None  # invalid: the Reshape fails at run time
        else:
            out.append(dim)
    if out.count("-1") > 1:
        return None
    if "-1" in out:
        index = out.index("-1")
        out[index] = _quotient(data, out[:index] + out[index + 1 :])
    return out


def _broadcast(*shapes: list[Dim]) -> list[Dim]:
    """The dims of numpy broadcasting (right-aligned) of ``shapes``, as far as they are known.

    Besides equal dims and 1s: a size > 1 against an unknown dim is that size (the other is
    1 or the same, else the op fails), and ``Min(k, S)`` against ``S`` is ``S`` (``clamped_to``
    says why), which ONNX's inference does not know.
    """
    rank = max(len(dims) for dims in shapes)
    out: list[Dim] = [1] * rank
    for dims in shapes:
        padded = [1] * (rank - len(dims)) + list(dims)
        out = [_broadcast_dim(a, b) for a, b in zip(out, padded, strict=True)]
    return out


def _broadcast_dim(a: Dim, b: Dim) -> Dim:
    if a == b or b == 1:
        return a
    if a == 1:
        return b
    for one, other in ((a, b), (b, a)):
        if isinstance(one, int) and one > 1 and not isinstance(other, int):
            return one
        if clamped_to(one, other):
            return other
    return None


BROADCASTING_OPS = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "Max", "Min", "Sum", "Mean"}
    | {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor"}
)


def _proven_dims(node: ir.Node) -> list[Dim] | None:
    """The output dims of a standard ``Reshape``/``Expand``/``ConstantOfShape``/``Slice`` that
    its shape vector (or slice parameters) proves, or of a broadcasting op, else None."""
    if not is_standard(node) or not node.inputs or len(node.outputs) != 1:
        return None
    if node.op_type in BROADCASTING_OPS:  # ONNX broadcasts all but Min(k, S) against S
        if any(v is None or v.shape is None for v in node.inputs):
            return None
        shapes = [_dims_of(v) for v in node.inputs if v is not None]
        if not any(isinstance(d, str) and d.startswith("Min(") for dims in shapes for d in dims):
            return None
        return _broadcast(*shapes)
    if node.op_type == "ConstantOfShape":
        dims = shape_value(node.inputs[0])
        return None if dims is None else [None if _negative(d) else d for d in dims]
    if node.op_type not in ("Reshape", "Expand", "Slice") or len(node.inputs) < 2:
        return None
    data = node.inputs[0]
    known = None if data is None or data.shape is None else _dims_of(data)
    if node.op_type == "Slice":
        return None if known is None else _sliced(known, node)
    target = shape_value(node.inputs[1])
    if target is None:
        return None
    if node.op_type == "Reshape":
        return _reshaped(known, target, bool(node.attributes.get_int("allowzero", 0)))
    return None if known is None else _broadcast(known, target)


def _negative(dim: Dim) -> bool:
    return isinstance(dim, int) and dim < 0


def _whole(end: Dim, size: Dim) -> bool:
    """Whether a slice ending at ``end`` (start 0, step 1) keeps an axis of ``size``."""
    return end == size or (isinstance(end, int) and end >= 2**62)  # INT64_MAX and kin


def _dims_of(value: ir.Value) -> list[Dim]:
    return [dim_of(value, i) for i in range(len(value.shape or ()))]


def _sliced(data: list[Dim], node: ir.Node) -> list[Dim] | None:
    """``Slice``'s dims: axes it does not slice keep theirs (ONNX gives up on all of them
    when a start or end is computed at run time); a sliced axis is known when its size, start,
    end and step are, or when it is sliced whole (``0:dim`` with step 1); ``[0:S]`` of a size
    k is ``Min(k, S)`` (BERT's ``position_ids[:, :S]``)."""
    if len(node.inputs) < 3:  # Slice-1 keeps its parameters in attributes
        return None
    starts, ends = shape_value(node.inputs[1]), shape_value(node.inputs[2])
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = list(range(len(starts)))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        given = shape_value(node.inputs[3])
        if given is None or len(given) != len(starts) or not all(isinstance(a, int) for a in given):
            return None
        axes = [a + len(data) if a < 0 else a for a in given]
    steps: list[Dim] = [1] * len(starts)
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        steps = shape_value(node.inputs[4]) or []
        if len(steps) != len(starts):
            return None
    if len(set(axes)) != len(axes) or not all(0 <= a < len(data) for a in axes):
        return None
    out = list(data)
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        size = data[axis]
        if isinstance(size, int) and all(isinstance(v, int) for v in (start, end, step)):
            out[axis] = len(range(size)[slice(start, end, step)]) if step else None
        elif start == 0 and step == 1 and size is not None and _whole(end, size):
            out[axis] = size
        elif start == 0 and step == 1 and isinstance(size, int) and _strength(end) == 2:
            out[axis] = f"Min({size}, {end})"  # end is a dim, so never negative
        else:
            out[axis] = None
    return out


def _strength(dim: object) -> int:
    """How much a dim says: a size 3, a named symbol 2, a made-up ``unk__`` symbol 1, none 0."""
    if isinstance(dim, int):
        return 3
    name = getattr(dim, "value", dim)
    if isinstance(name, str) and name:
        return 1 if name.startswith(GENERATED) else 2
    return 0


def refine(model: ir.Model) -> list[ir.Value]:
    """Give each ``Reshape``/``Expand``/``ConstantOfShape``/``Slice`` output the sizes and
    named symbols its shape vector (slice parameters) proves, and each broadcasting op's
    output those of a ``Min(k, S)`` against ``S``, where its shape says less; returns the
    values changed.

    Only sizes and named symbols replace what is there (never ONNX's made-up ``unk__``
    symbols), so a second call finds nothing.
    """
    changed = []
    for graph in model.graphs():
        for node in graph:
            out = node.outputs[0] if node.outputs else None
            if out is None or out.is_graph_output():
                continue
            proven = _proven_dims(node)
            if proven is None:
                continue
            if out.shape is None:  # made-up symbols are ONNX's to name
                if any(_strength(d) >= 2 for d in proven):
                    out.shape = ir.Shape([d if _strength(d) >= 2 else None for d in proven])
                    changed.append(out)
                continue
            current = list(out.shape)
            if len(current) != len(proven):
                continue  # a rank conflict: the node fails at run time; leave it to ONNX
            better = [
                new if _strength(new) >= 2 and _strength(new) > _strength(old) else old
                for old, new in zip(current, proven, strict=True)
            ]
            if any(new is not old for new, old in zip(better, current, strict=True)):
                out.shape = ir.Shape(better)
                changed.append(out)
    return changed
