"""Hand a fused decoder ``Attention`` (opset 23) its KV cache and its 3D projections.

After ``fuse_rotary_embedding`` and ``fuse_decoder_attention`` a Llama-family layer still
splits heads, rotates in 4D, appends to the cache and merges heads around the fused op::

    before:  q4 = RotaryEmbedding(Transpose<0,2,1,3>(Reshape(q3, [B, S, H, D])), cos, sin)
             k4 = RotaryEmbedding(Transpose<0,2,1,3>(Reshape(k3, [B, S, Hkv, D])), cos, sin)
             v4 = Transpose<0,2,1,3>(Reshape(v3, [B, S, Hkv, D]))
             present_k = Concat<axis=2>(past_k, k4)      present_v = Concat<axis=2>(past_v, v4)
             y4 = Attention<scale>(q4, present_k, present_v, mask)
             y  = Reshape(Transpose<0,2,1,3>(y4), [B, S, H*D])       (a NaN guard on y4 moves to y)
    after:   y, present_k, present_v = Attention<scale, q_num_heads=H, kv_num_heads=Hkv>(
                 RotaryEmbedding<num_heads=H>(q3, cos, sin),
                 RotaryEmbedding<num_heads=Hkv>(k3, cos, sin), v3, mask, past_k, past_v)

Attention-23 concatenates the cache itself (``present = Concat(past, new)`` on the sequence
axis, exactly the export's Concat) and takes and returns 3D ``(B, S, heads*D)`` tensors;
RotaryEmbedding-23 rotates 3D input head by head given ``num_heads``. Each layer loses its
three head splits, the merge, both cache Concats and their shape math (about 14 nodes),
which is per-token overhead in a one-token decode step. The present tensors stay graph
outputs with their names and shapes, so the model's interface is unchanged.

The mask's ``Slice`` reads the key length from ``Shape(present_k)``; with the present made
by the Attention that would be a cycle, so such reads are rewired: dims 0, 1 and 3 from the
past (``Concat`` needs them equal), dim 2 as ``past length + new length``.

Checks (each proven on the graph, else the layer is left as it is): the Attention has only
``scale`` (no causal flag, softcap or extra outputs) and 4D inputs; the head splits are
``Reshape`` to ``[dim0, dim1, heads, D]`` of the projection or of the projection's MatMul
input (same leading dims), with ``heads * D`` its static hidden size; the merge gives
``[dim0, dim1, H*D]`` of the same; the rotations take cos/sin caches and no position ids;
every intermediate is private to the layer, apart from the present tensors' Shape readers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array, is_standard, replace_value
from graph_passes.fusion import Emits, ExpectedRow, Fusion
from graph_passes.fusions._attention_match import ATTENTION_OPS
from graph_passes.fusions._repeat_kv import shape_entries
from graph_passes.match import is_op, opset_of, producer
from graph_passes.shapes import infer_shapes

logger = logging.getLogger(__name__)

TO_HEADS = [0, 2, 1, 3]
PLAIN_ROTARY = {"interleaved"}  # attributes a rotation may carry to be moved to 3D


class _Reject(Exception):
    """A fused Attention whose surroundings cannot be proven to be the pattern above."""


@dataclass
class _Side:
    """One of q, k, v: the 3D projection and the nodes that bring it to 4D heads."""

    x3: ir.Value  # (B, S, heads*D)
    heads: int
    size: int  # D
    rotary: ir.Node | None
    nodes: list[ir.Node] = field(default_factory=list)


class FuseAttentionCache(Fusion):
    """Attention-23 over Concat'ed cache and 4D heads -> Attention-23 with past in, 3D io."""

    name: ClassVar[str] = "fuse_attention_cache"
    position: ClassVar[int] = 82
    runs_after: ClassVar[tuple[str, ...]] = ("fuse_rotary_embedding", "fuse_decoder_attention")
    emits: ClassVar[Emits] = Emits(standard={"Attention": 23, "RotaryEmbedding": 23})
    expected: ClassVar[ExpectedRow] = ExpectedRow("attention", ATTENTION_OPS)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.rejected: list[str] = []
        if opset_of(model) < self.emits.standard["Attention"]:
            return self.result(model)
        infer_shapes(model)
        for graph in model.graphs():
            for node in list(graph):
                if not (is_op(node, "Attention") and is_standard(node)) or node.graph is not graph:
                    continue
                try:
                    self._fuse(graph, node)
                except _Reject as reason:
                    self.rejected.append(f"{node.name}: {reason}")
                    logger.debug("attention %s keeps its cache outside: %s", node.name, reason)
                    continue
                self.matches += 1
        return self.result(model)

    def _fuse(self, graph: ir.Graph, att: ir.Node) -> None:
        if set(att.attributes) - {"scale"} or len(att.outputs) != 1 or len(att.inputs) > 4:
            raise _Reject("not the plain 4D form (attributes, cache inputs or extra outputs)")
        q4, present_k, present_v = att.inputs[:3]
        mask = att.inputs[3] if len(att.inputs) == 4 else None
        past_k, k4, cache_k = _cache(present_k, att)
        past_v, v4, cache_v = _cache(present_v, att)
        q = _side(q4, {att}, rotary_allowed=True)
        k = _side(k4, {cache_k}, rotary_allowed=True)
        v = _side(v4, {cache_v}, rotary_allowed=False)
        if not (q.size == k.size == v.size and k.heads == v.heads and q.heads % k.heads == 0):
            raise _Reject("q/k/v heads or head sizes do not form grouped attention")
        guard, merge_nodes, out, sizes = _merge(att, q)
        readers = [
            [u.node for u in cache.outputs[0].uses() if is_op(u.node, "Shape")]
            for cache in (cache_k, cache_v)
        ]

        new: list[ir.Node] = []
        q3 = _rotate(q, new)
        k3 = _rotate(k, new)
        attrs = [
            att.attributes["scale"] if "scale" in att.attributes else None,
            ir.AttrInt64("q_num_heads", q.heads),
            ir.AttrInt64("kv_num_heads", k.heads),
        ]
        fused = ir.Node(
            "",
            "Attention",
            [q3, k3, v.x3, mask, past_k, past_v],
            [a for a in attrs if a is not None],
            num_outputs=3,
            name=att.name,
        )
        new.append(fused)
        for value, old in zip(fused.outputs, (out, present_k, present_v), strict=True):
            value.type, value.shape = old.type, old.shape
        y = fused.outputs[0]
        if guard is not None:
            isnan = ir.Node("", "IsNaN", [y], name=f"{att.name}/nan")
            where = ir.Node("", "Where", [isnan.outputs[0], guard, y], name=f"{att.name}/nan0")
            new += [isnan, where]
            y = where.outputs[0]
            y.type, y.shape = out.type, out.shape
        graph.insert_before(att, new)
        for reader, (past, new_len) in zip(readers, ((past_k, k.x3), (past_v, v.x3)), strict=True):
            _rewire_shapes(graph, reader, past, new_len)
        for size in sizes:  # dims 0, 1 of (B, S, H, D) heads: those of the (B, S, H*D) output
            size.replace_input_with(0, y)
        for old, value in ((out, y), (present_k, fused.outputs[1]), (present_v, fused.outputs[2])):
            name = old.name
            replace_value(old, value)
            value.name = name
        dead = [*merge_nodes, att, cache_k, cache_v, *q.nodes, *k.nodes, *v.nodes]
        graph.remove(sorted(set(dead), key=dead.index), safe=True)


def _cache(present: ir.Value | None, att: ir.Node) -> tuple[ir.Value, ir.Value, ir.Node]:
    """``(past, new, concat)`` for ``present = Concat<axis=2>(past, new)``."""
    concat = producer(present, "Concat")
    if concat is None or concat.attributes.get_int("axis", 0) not in (2, -2):
        raise _Reject("key/value is not Concat<axis=2>(past, new)")
    if len(concat.inputs) != 2:
        raise _Reject("key/value is not Concat<axis=2>(past, new)")
    past, new = concat.inputs
    if past is None or past.shape is None or len(past.shape) != 4:
        raise _Reject("the past is not a 4D (B, Hkv, P, D) tensor")
    for use in present.uses():
        if use.node is not att and not _reads_static_dims(use.node):
            raise _Reject(f"{present.name} is read by {use.node.op_type}, not only by Shape")
    return past, new, concat


def _reads_static_dims(node: ir.Node, dims: tuple[int, ...] = (0, 1, 2, 3)) -> bool:
    """A ``Shape`` (whole, of a 4D tensor) whose every reader is ``Gather(axis 0)`` of one
    constant, non-negative index among ``dims``."""
    if not is_op(node, "Shape") or node.attributes or node.outputs[0].is_graph_output():
        return False
    for use in node.outputs[0].uses():
        index = constant_array(use.node.inputs[1]) if is_op(use.node, "Gather") else None
        if index is None or index.ndim != 0 or use.node.attributes.get_int("axis", 0) != 0:
            return False
        if int(index) not in dims:  # a negative index would mean another dim once rewired
            return False
        if use.node.outputs[0].is_graph_output():
            return False
    return True


def _side(x4: ir.Value | None, users: set[ir.Node], rotary_allowed: bool) -> _Side:
    """q, k or v: ``[RotaryEmbedding](Transpose<0,2,1,3>(Reshape(x3, [B, S, heads, D])))``."""
    nodes: list[ir.Node] = []
    rotary = producer(x4, "RotaryEmbedding") if rotary_allowed else None
    value = x4
    if rotary is not None:
        if set(rotary.attributes) - PLAIN_ROTARY or len(rotary.inputs) != 3:
            raise _Reject("the rotation has position ids or a partial rotary dim")
        nodes.append(rotary)
        value = rotary.inputs[0]
    transpose = producer(value, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", ())) != TO_HEADS:
        raise _Reject("q/k/v is not Transpose<0,2,1,3> of a head split")
    split = producer(transpose.inputs[0], "Reshape")
    if split is None or split.attributes.get_int("allowzero", 0):
        raise _Reject("the head split is not a Reshape")
    nodes += [transpose, split]
    x3 = split.inputs[0]
    heads, size = _head_split(split, x3)
    _check_private(nodes, users)
    return _Side(x3, heads, size, rotary, nodes)


def _sources(x3: ir.Value) -> list[ir.Value]:
    """Values with ``x3``'s dims 0 and 1: itself, and the input of the MatMul (optionally
    plus a constant bias) by a 2D constant weight that made it."""
    found = [x3]
    node = producer(x3, "Add")
    if node is not None and any(constant_array(v) is not None for v in node.inputs):
        x3 = next(v for v in node.inputs if constant_array(v) is None)
    matmul = producer(x3, "MatMul")
    weight = None if matmul is None else constant_array(matmul.inputs[1])
    if weight is not None and weight.ndim == 2:
        found.append(matmul.inputs[0])
    return found


def _entries(shape: ir.Value, x3: ir.Value, also: ir.Value | None = None) -> list | None:
    """The entries of a Reshape target whose first two are dims 0 and 1 of ``x3``, read
    from ``x3``, from a value with the same leading dims, or from ``also``."""
    for source in [*_sources(x3), *([also] if also is not None else [])]:
        entries = shape_entries(shape, source)
        if entries is not None and entries[:2] == ["dim0", "dim1"]:
            return entries
    return None


def _head_split(split: ir.Node, x3: ir.Value) -> tuple[int, int]:
    hidden = x3.shape[-1] if x3.shape is not None and len(x3.shape) == 3 else None
    entries = _entries(split.inputs[1], x3)
    if not isinstance(hidden, int) or entries is None or len(entries) != 4:
        raise _Reject("the head split is not [B, S, heads, D] of a (B, S, hidden) projection")
    heads, size = entries[2], entries[3]
    if heads == -1 and isinstance(size, int) and size > 0:
        heads = hidden // size
    if size == -1 and isinstance(heads, int) and heads > 0:
        size = hidden // heads
    if not (isinstance(heads, int) and isinstance(size, int) and heads * size == hidden):
        raise _Reject(f"heads x head size != hidden size {hidden}")
    return heads, size


def _merge(att: ir.Node, q: _Side) -> tuple[ir.Value | None, list[ir.Node], ir.Value]:
    """``(guard zero, nodes, merged, sizes)``: y4 [-> Where(IsNaN(y4), 0, y4)] ->
    Transpose -> Reshape to (B, S, H*D); ``sizes``: Shape nodes of the transposed heads
    that read only batch and sequence (the merge's own shape math)."""
    y4, nodes, zero = att.outputs[0], [], None
    isnan = next((u.node for u in y4.uses() if is_op(u.node, "IsNaN")), None)
    if isnan is not None:
        where = _only_use(isnan.outputs[0], "Where")
        zero = None if where is None else where.inputs[1]
        value = constant_array(zero)
        if where is None or where.inputs[2] is not y4 or value is None or value.size != 1:
            raise _Reject("the output's NaN guard is not Where(IsNaN(y), 0, y)")
        if float(value.reshape(-1)[0]) != 0.0 or len(y4.uses()) != 2:
            raise _Reject("the output's NaN guard is not Where(IsNaN(y), 0, y)")
        nodes += [isnan, where]
        y4 = where.outputs[0]
    transpose = _only_use(y4, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", ())) != TO_HEADS:
        raise _Reject("the output is not Transpose<0,2,1,3> then Reshape")
    heads = transpose.outputs[0]
    uses = [u.node for u in heads.uses()]
    merge = next((n for n in uses if is_op(n, "Reshape") and n.inputs[0] is heads), None)
    sizes = [n for n in uses if n is not merge]
    if merge is None or merge.attributes.get_int("allowzero", 0) or heads.is_graph_output():
        raise _Reject("the output is not Transpose<0,2,1,3> then Reshape")
    if not all(_reads_static_dims(n, (0, 1)) for n in sizes):
        raise _Reject("the merged heads are read by more than the merge's own shape")
    entries = _entries(merge.inputs[1], q.x3, also=heads)
    if entries is None or len(entries) != 3 or entries[2] not in (-1, q.heads * q.size):
        raise _Reject("the merge is not [B, S, H*D] of q's projection")
    _check_private([att, *nodes], {transpose})
    return zero, [*nodes, transpose, merge], merge.outputs[0], sizes


def _only_use(value: ir.Value, op: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or not is_op(uses[0].node, op):
        return None
    return uses[0].node if uses[0].idx == 0 else None


def _check_private(nodes: list[ir.Node], users: set[ir.Node]) -> None:
    """Every output of ``nodes`` is read only by the chain itself or ``users``."""
    inside = set(nodes) | users
    for node in nodes:
        if not is_standard(node):
            raise _Reject("a node of the pattern is not in the standard domain")
        for out in node.outputs:
            if out.is_graph_output() or any(u.node not in inside for u in out.uses()):
                raise _Reject(f"{out.name} is used outside the attention")


def _rotate(side: _Side, new: list[ir.Node]) -> ir.Value:
    """``side``'s 3D projection, rotated in 3D when it was rotated in 4D."""
    if side.rotary is None:
        return side.x3
    old = side.rotary
    attrs = [a for a in old.attributes.values()] + [ir.AttrInt64("num_heads", side.heads)]
    node = ir.Node("", "RotaryEmbedding", [side.x3, *old.inputs[1:]], attrs, name=old.name)
    node.outputs[0].type, node.outputs[0].shape = side.x3.type, side.x3.shape
    new.append(node)
    return node.outputs[0]


def _rewire_shapes(graph: ir.Graph, readers: list[ir.Node], past: ir.Value, new3: ir.Value) -> None:
    """Shape(present) -> Shape(past); its dim-2 reads -> past length + new length."""
    for shape_node in readers:
        shape_node.replace_input_with(0, past)
        for use in list(shape_node.outputs[0].uses()):
            gather = use.node
            if int(constant_array(gather.inputs[1])) != 2:
                continue
            one = ir.tensor(np.array(1, dtype=np.int64))  # the sequence axis of (B, S, hidden)
            const = ir.Node("", "Constant", [], [ir.AttrTensor("value", one)])
            new_shape = ir.Node("", "Shape", [new3])
            new_len = ir.Node("", "Gather", [new_shape.outputs[0], const.outputs[0]])
            total = ir.Node("", "Add", [gather.outputs[0], new_len.outputs[0]])
            graph.insert_after(gather, [const, new_shape, new_len, total])
            length = gather.outputs[0]
            for later in list(length.uses()):
                if later.node is not total:
                    later.node.replace_input_with(later.idx, total.outputs[0])
            total.outputs[0].type = length.type
            total.outputs[0].shape = length.shape
