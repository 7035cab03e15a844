"""Grouped-query attention's ``repeat_kv``: a KV head tensor repeated for each query group.

Llama-family exports (transformers' ``repeat_kv``, traced by optimum / torch.onnx) turn the
cache's ``(B, Hkv, T, D)`` key or value into ``(B, Hkv * n, T, D)`` for ``n`` query heads per
KV head::

    u = Unsqueeze(kv, axes=[2])                                   (B, Hkv, 1, T, D)
    e = Expand(u, shape5)      shape5 = [B, Hkv, n, T, D]         (B, Hkv, n, T, D)
    r = Reshape(e, shape4)     shape4 = [B, Hkv * n, T, D]        (B, Hkv * n, T, D)

so query head ``h`` reads KV head ``h // n``: the grouping of standard ``Attention`` (opset
23) and of ORT's GroupQueryAttention. The shape vectors are constants or built at run time
as ``Concat`` of constants and ``Unsqueeze(Gather(Shape(kv), i))`` (dim ``i`` of the KV
tensor), the 5-D one possibly through torch's ``Where(Equal(s, -1), 1, s)`` (an ``expand``
with -1 entries; every entry here is a size or a constant >= 1, so it is ``s`` itself).
``repeat_kv`` accepts exactly that, with every entry proven: batch and length read from
``kv`` itself (or equal to its static dims), ``Hkv`` and ``D`` equal to ``kv``'s static dims.

Shared by fuse_decoder_attention (which removes the repeat) and raise_opset (whose rule for
decoders asks whether a model has grouped-query attention that only opset 23 can fuse).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array
from graph_passes.match import is_op, producer


@dataclass
class RepeatKV:
    """``repeated = repeat_kv(kv, groups)``; ``nodes`` are the Unsqueeze, Expand, Reshape."""

    kv: ir.Value  # (B, Hkv, T, D)
    groups: int  # n: query heads per KV head
    nodes: list[ir.Node] = field(default_factory=list)


def repeat_kv(repeated: ir.Value | None) -> RepeatKV | None:
    """The ``repeat_kv`` producing ``repeated``, or None when it is not one (proven)."""
    reshape = producer(repeated, "Reshape")
    expand = None if reshape is None else producer(reshape.inputs[0], "Expand")
    unsqueeze = None if expand is None else producer(expand.inputs[0], "Unsqueeze")
    if unsqueeze is None or reshape.attributes.get_int("allowzero", 0) != 0:
        return None
    if _axes(unsqueeze) != [2]:
        return None
    kv = unsqueeze.inputs[0]
    if kv is None or kv.shape is None or len(kv.shape) != 4:
        return None
    heads, size = kv.shape[1], kv.shape[3]
    if not (isinstance(heads, int) and isinstance(size, int)):
        return None
    five = shape_entries(_strip_minus_one(expand.inputs[1]), kv)
    four = shape_entries(reshape.inputs[1], kv)
    if five is None or four is None or len(five) != 5 or len(four) != 4:
        return None
    groups = five[2]
    if not isinstance(groups, int) or groups < 1:
        return None
    if not (
        _fits(five, [0, heads, groups, 2, size], kv)
        and _fits(four, [0, heads * groups, 2, size], kv)
    ):
        return None
    for node in (unsqueeze, expand):  # private to the repeat
        out = node.outputs[0]
        if out.is_graph_output() or len(out.uses()) != 1:
            return None
    return RepeatKV(kv, groups, [unsqueeze, expand, reshape])


def _fits(entries: list, expected: list, kv: ir.Value) -> bool:
    """``expected``: at positions 0 and 3/2 (batch, length) the kv dim index to read, else
    the constant. A dim entry matches a read of that dim of ``kv`` or its static value."""
    if len(entries) != len(expected):
        return False
    dims = (0, len(expected) - 2)  # batch first, length second to last
    for i, (got, want) in enumerate(zip(entries, expected, strict=True)):
        if i in dims:
            static = kv.shape[want]
            if got != f"dim{want}" and not (isinstance(static, int) and got == static):
                return False
        elif got != want:
            return False
    return True


def shape_entries(shape: ir.Value | None, source: ir.Value) -> list | None:
    """The entries of a shape vector: ints, or ``"dimI"`` where the entry is built as
    ``Unsqueeze(Gather(Shape(source), I))`` (dim I of ``source``); None when an entry is
    anything else."""
    array = constant_array(shape)
    if array is not None:
        return [int(d) for d in array.reshape(-1)]
    concat = producer(shape, "Concat")
    if concat is None or concat.attributes.get_int("axis", 0) != 0:
        return None
    entries: list = []
    for piece in concat.inputs:
        array = constant_array(piece)
        if array is not None:
            entries += [int(d) for d in array.reshape(-1)]
            continue
        dim = _dim_read(piece, source)
        if dim is None:
            return None
        entries.append(dim)
    return entries


def _dim_read(piece: ir.Value | None, source: ir.Value) -> str | None:
    """``"dimI"`` when ``piece`` is ``Unsqueeze(Gather(Shape(source), I), axes=[0])``."""
    unsqueeze = producer(piece, "Unsqueeze")
    gather = None if unsqueeze is None else producer(unsqueeze.inputs[0], "Gather")
    shape_of = None if gather is None else producer(gather.inputs[0], "Shape")
    if shape_of is None or shape_of.inputs[0] is not source or shape_of.attributes:
        return None
    if gather.attributes.get_int("axis", 0) != 0 or _axes(unsqueeze) != [0]:
        return None
    index = constant_array(gather.inputs[1])
    if index is None or index.ndim != 0:
        return None
    rank = len(source.shape) if source.shape is not None else None
    i = int(index)
    if rank is None or not -rank <= i < rank:
        return None
    return f"dim{i % rank}"


def _strip_minus_one(shape: ir.Value | None) -> ir.Value | None:
    """``s`` for torch's ``Where(Equal(s, -1), 1, s)`` (no entry of ``s`` is -1 here: each is
    proven a size or a positive constant by the caller), else ``shape`` itself."""
    where = producer(shape, "Where")
    equal = None if where is None else producer(where.inputs[0], "Equal")
    if equal is None:
        return shape
    s = where.inputs[2]
    minus = constant_array(equal.inputs[1])
    ones = constant_array(where.inputs[1])
    if equal.inputs[0] is not s or minus is None or ones is None:
        return shape
    if not (np.all(minus == -1) and np.all(ones == 1)):
        return shape
    return s


def _axes(node: ir.Node) -> list[int] | None:
    axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None:
        ints = node.attributes.get_ints("axes", None)
        return None if ints is None else list(ints)
    return [int(a) for a in axes.reshape(-1)]


def has_grouped_kv_attention(model: ir.Model) -> bool:
    """Whether a Softmax attention in ``model`` reads K^T as a repeated KV cache: a
    ``Transpose<0,1,3,2>`` feeding the scores of a Softmax, of ``Reshape(Expand(Unsqueeze(
    present, axes=[2])))`` where ``present`` is a ``Concat`` of a graph input (the past).

    Structural and loose on purpose (the shape vectors are not proven, so it holds on the raw
    export before any folding): it decides an opset raise, which changes no result;
    ``repeat_kv`` proves the repeat before anything is fused."""
    inputs = set(model.graph.inputs)
    for node in model.graph:
        if not is_op(node, "Transpose") or list(node.attributes.get_ints("perm", ())) != [
            0,
            1,
            3,
            2,
        ]:
            continue
        reshape = producer(node.inputs[0], "Reshape")
        expand = None if reshape is None else producer(reshape.inputs[0], "Expand")
        unsqueeze = None if expand is None else producer(expand.inputs[0], "Unsqueeze")
        cache = None if unsqueeze is None else producer(unsqueeze.inputs[0], "Concat")
        if cache is None or _axes(unsqueeze) != [2]:
            continue
        if any(v in inputs for v in cache.inputs) and _feeds_softmax(node.outputs[0]):
            return True
    return False


def _feeds_softmax(value: ir.Value, depth: int = 4) -> bool:
    """Whether ``value`` reaches a Softmax through at most ``depth`` Mul/Div/MatMul/Add."""
    for use in value.uses():
        node = use.node
        if is_op(node, "Softmax"):
            return True
        if depth and is_op(node, "Mul", "Div", "MatMul", "Add"):
            if _feeds_softmax(node.outputs[0], depth - 1):
                return True
    return False
