"""Fuse HF's rotary position embedding (``rotate_half``) into standard RotaryEmbedding-23.

Llama-family exports (transformers, traced by optimum or torch.onnx) compute the angles once
and rotate q and k of every layer::

    before:  f  = (B, S, D/2) angles              e = Concat<axis=-1>(f, f)      (B, S, D)
             cu = Unsqueeze(Cos(e), [1])          su = Unsqueeze(Sin(e), [1])   (B, 1, S, D)
             x1 = Slice(x, 0, D/2, axis -1)       x2 = Slice(x, D/2, end, axis -1)
             y  = Add(Mul(x, cu), Mul(Concat<axis=-1>(Neg(x2), x1), su))        x: (B, N, S, D)
    after:   y  = RotaryEmbedding<interleaved=0>(x, Cos(f), Sin(f))             (opset 23)

The math: ``y[.., :D/2] = x1 cos f - x2 sin f`` and ``y[.., D/2:] = x2 cos f + x1 sin f``,
which is RotaryEmbedding's non-interleaved rotation with ``cos_cache = cos(f)`` and
``sin_cache = sin(f)`` given per batch and position ((B, S, D/2), no ``position_ids``).

Why that form: ORT's ``com.microsoft.RotaryEmbedding`` (and RotaryEmbedding with position
ids) read a ``(max_position, D/2)`` table by ``position_ids``; the export has no such limit
(any position works), so a table would make the fused model fail or read out of range on
inputs the original accepts. The per-batch caches are the export's own angles, computed as
before; only the ``Concat(f, f)`` doubling, the half slices and the five elementwise ops go.
The new ``Cos(f)``/``Sin(f)`` are made once per angle tensor and shared by every layer.

Checks: ``x`` 4D with a static even last dim D; the slices are exactly ``[0, D/2)`` and
``[D/2, end)`` on the last axis with step 1; both Concats on the last axis; the Unsqueezes
put the head axis at 1 of a 3D (B, S, D) angle tensor; every intermediate private. Below
opset 23 matches are counted in ``blocked`` (``raise_opset`` makes them fusable).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array, outside_use
from graph_passes.fusion import Emits, ExpectedRow, Fusion
from graph_passes.match import is_op, opset_of, probe_node, producer
from graph_passes.shapes import infer_shapes

logger = logging.getLogger(__name__)


class FuseRotaryEmbedding(Fusion):
    """Mul/Slice/Neg/Concat/Mul/Add around Cos/Sin of doubled angles -> RotaryEmbedding-23."""

    name: ClassVar[str] = "fuse_rotary_embedding"
    position: ClassVar[int] = 75
    emits: ClassVar[Emits] = Emits(standard={"RotaryEmbedding": 23})
    expected: ClassVar[ExpectedRow] = ExpectedRow("rotary", frozenset({"RotaryEmbedding"}))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.blocked = 0
        self.declined = 0
        opset = opset_of(model)
        infer_shapes(model)
        for graph in model.graphs():
            caches: dict[int, tuple[ir.Value, ir.Value]] = {}
            for add in list(graph):
                if add.graph is not graph:
                    continue  # removed by an earlier match
                match = self._match(add)
                if match is None:
                    continue
                if not self.can_emit_standard("RotaryEmbedding", opset):
                    self.blocked += 1
                    continue
                x, angles, nodes = match
                attrs = [ir.AttrInt64("interleaved", 0)]
                probe_inputs = [x, angles, angles]
                probe = probe_node("", "RotaryEmbedding", probe_inputs, attrs)
                if not self.rewrite_pays(nodes, [add.outputs[0]], [probe], [probe.outputs[0]]):
                    self.declined += 1
                    continue
                cos, sin = caches.get(id(angles)) or self._caches(graph, angles, caches)
                node = ir.Node("", "RotaryEmbedding", [x, cos, sin], attrs, name=add.name)
                out = add.outputs[0]
                node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
                graph.insert_before(add, node)
                name = out.name
                out.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
                graph.remove(nodes, safe=True)
                node.outputs[0].name = name
                self.matches += 1
            if self.matches:
                graph.sort()
        if self.blocked:
            logger.info("%d rotary embeddings need opset >= 23", self.blocked)
        return self.result(model)

    def _caches(self, graph: ir.Graph, angles: ir.Value, caches: dict) -> tuple:
        """``Cos(angles)``, ``Sin(angles)`` right after the angles are computed."""
        made = []
        for op in ("Cos", "Sin"):
            node = ir.Node("", op, [angles], name=f"{angles.name}/{op.lower()}_cache")
            node.outputs[0].name = f"{angles.name}_{op.lower()}_cache"
            node.outputs[0].type, node.outputs[0].shape = angles.type, angles.shape
            made.append(node)
        where = angles.producer()
        if where is None:
            graph.insert_before(graph.node(0), made)
        else:
            graph.insert_after(where, made)
        caches[id(angles)] = (made[0].outputs[0], made[1].outputs[0])
        return caches[id(angles)]

    def _match(self, add: ir.Node) -> tuple | None:
        """``(x, angles, nodes)`` of the rotation ending at ``add``, else None."""
        if not is_op(add, "Add"):
            return None
        for a, b in (add.inputs, add.inputs[::-1]):
            direct, rotated = producer(a, "Mul"), producer(b, "Mul")
            if direct is None or rotated is None:
                continue
            for x, cos_u in (direct.inputs, direct.inputs[::-1]):
                angles = _trig_of(cos_u, "Cos")
                if angles is None:
                    continue
                found = self._rotated_half(rotated, x, angles)
                if found is None:
                    continue
                nodes = [direct, *found, rotated, add]
                reason = outside_use(nodes)
                if reason is None:
                    return x, angles, nodes
                logger.debug("rotary at %s not fused: %s", add.name, reason)
        return None

    def _rotated_half(self, mul: ir.Node, x: ir.Value, angles: ir.Value) -> list | None:
        """``[Slice, Slice, Neg, Concat]`` when ``mul`` is ``rotate_half(x) * Unsqueeze(Sin)``
        of the same angles."""
        for rot, sin_u in (mul.inputs, mul.inputs[::-1]):
            if _trig_of(sin_u, "Sin") is not angles:
                continue
            concat = producer(rot, "Concat")
            if concat is None or len(concat.inputs) != 2 or not _last_axis(concat, 4):
                continue
            neg = producer(concat.inputs[0], "Neg")
            first = producer(concat.inputs[1], "Slice")
            second = None if neg is None else producer(neg.inputs[0], "Slice")
            size = _last_dim(x)
            if first is None or second is None or size is None or size % 2:
                continue
            half = size // 2
            if _slice_of(first, x, 0, half, size) and _slice_of(second, x, half, size, size):
                return [first, second, neg, concat]
        return None


def _last_dim(x: ir.Value) -> int | None:
    if x is None or x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
        return None
    return x.shape[3]


def _last_axis(node: ir.Node, rank: int) -> bool:
    return node.attributes.get_int("axis", 0) in (-1, rank - 1)


def _trig_of(value: ir.Value | None, op: str) -> ir.Value | None:
    """The angles ``f`` when ``value`` is ``Unsqueeze(op(Concat<-1>(f, f)), [1])`` (f 3D)."""
    unsqueeze = producer(value, "Unsqueeze")
    trig = None if unsqueeze is None else producer(unsqueeze.inputs[0], op)
    concat = None if trig is None else producer(trig.inputs[0], "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return None
    axes = constant_array(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    if axes is None or axes.reshape(-1).tolist() != [1] or not _last_axis(concat, 3):
        return None
    angles = concat.inputs[0]
    if angles.shape is None or len(angles.shape) != 3:
        return None
    return angles


def _slice_of(node: ir.Node, x: ir.Value, start: int, end: int, size: int) -> bool:
    """Whether ``node`` is ``x[..., start:end]`` (the end may be any value >= ``size``)."""
    if node.inputs[0] is not x or len(node.inputs) < 4:
        return False
    starts, ends, axes = (constant_array(v) for v in node.inputs[1:4])
    steps = constant_array(node.inputs[4]) if len(node.inputs) > 4 else np.ones(1)
    if any(a is None or a.size != 1 for a in (starts, ends, axes, steps)):
        return False
    if int(axes.reshape(-1)[0]) not in (-1, 3) or int(steps.reshape(-1)[0]) != 1:
        return False
    got_start, got_end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    if end >= size:
        return got_start == start and got_end >= size
    return got_start == start and got_end == end
