"""Fuse BERT's embedding block into one com.microsoft EmbedLayerNormalization.

A BERT-style encoder starts by summing two or three table lookups and normalizing::

    before:  w = Gather(word_table, input_ids)                   [B, S, H]
             t = Gather(type_table, token_type_ids)              [B, S, H]   (optional)
             p = Gather(pos_table, position_ids)                 [1, S, H] or [S, H]
             s = Add(Add(w, t), p)                               (any tree of Adds)
             z = LayerNormalization<axis=-1, epsilon=eps>(s, gamma, beta)
                 (or decomposed, or SkipLayerNormalization(one sum, the other sum))
    after:   ids = Cast<to=int32>(input_ids)   seg = Cast<to=int32>(token_type_ids)
             z, _[, s] = EmbedLayerNormalization<epsilon=eps>(ids, seg, word_table,
                                                             pos_table, type_table, gamma, beta)

The kernel computes ``LayerNorm(word[ids] + pos[j] + type[seg])`` for the token in column
``j``: positions are implicit, so the match is only taken when the position ids are provably
``0..S-1`` in every row. Two forms are recognized: ``Slice(arange_buffer, [0], S, [1|-1])``
(what torch exports for BERT's ``position_ids`` buffer, both exporters) and
``Range(0, S, 1)`` (optionally Unsqueezed), where ``S`` is read from a ``Shape`` of a tensor
whose dim is provably the ids' sequence dim (the same value or the same named symbol).

Facts about ORT 1.31's CPU kernel, probed: ids must be int32 (int64 is rejected, hence the
Casts); ``segment_ids``/``segment_embedding`` may be omitted; the node needs at least two
outputs (``mask_index``, left unused here: our attention fusion feeds the raw mask, which
is right for any padding); the optional third output is the sum before the norm, used when
the sum feeds more than the norm. Ids outside ``[0, rows)`` fail at run time, as Gather
does, except negative ids, which Gather wraps and the kernel rejects, and int64 ids beyond
int32, which the Cast wraps: tokenizer ids are never either. Contrib only: on ``portable``
nothing is fused.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array, take_over
from graph_passes.fusion import Emits, ExpectedRow, Fusion
from graph_passes.fusions._layer_norm_match import LayerNormMatcher
from graph_passes.match import ir_dims, is_op, only_use, opset_of, probe_node, producer, same_dim
from graph_passes.shapes import infer_shapes
from graph_passes.target.targets import CONTRIB_DOMAIN

logger = logging.getLogger(__name__)

OP = "EmbedLayerNormalization"
ID_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


def _int_const(value: ir.Value | None) -> list[int] | None:
    """A small integer constant as a flat list, else None."""
    array = constant_array(value)
    if array is None or array.dtype.kind not in "iu" or array.size > 4:
        return None
    return [int(x) for x in array.reshape(-1)]


class FuseEmbedLayerNorm(Fusion):
    """Gather(word) + Gather(position) [+ Gather(segment)] + LayerNorm -> EmbedLayerNorm."""

    name: ClassVar[str] = "fuse_embed_layer_norm"
    position: ClassVar[int] = 85
    in_default: ClassVar[bool] = False  # opt-in: see the module doc
    emits: ClassVar[Emits] = Emits(
        contrib=frozenset({"EmbedLayerNormalization"}),
        cuda=frozenset({"EmbedLayerNormalization"}),
    )
    shadows: ClassVar[tuple[str, ...]] = ("EmbedLayerNormFusion",)
    expected: ClassVar[ExpectedRow] = ExpectedRow(
        "layernorm", frozenset({"EmbedLayerNormalization"})
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.blocked = 0  # matched, but the target has no kernel for the fused node
        if not self.target.allows_contrib:
            return self.result(model)
        opset = opset_of(model)
        infer_shapes(model)
        matcher = LayerNormMatcher(opset)
        for graph in model.graphs():
            fused_here = 0
            for root in reversed(list(graph)):
                if root.graph is not graph:
                    continue
                norm = self._norm(root, matcher)
                if norm is not None:
                    fused_here += self._fuse(model, graph, root, *norm)
            if fused_here:
                graph.sort()
            self.matches += fused_here
        return self.result(model)

    def _norm(self, root: ir.Node, matcher: LayerNormMatcher) -> tuple | None:
        """``(terms, sum_value, gamma, beta, eps, nodes)`` of a last-axis norm at ``root``.

        ``terms`` are the values summed before the norm (one Add output, or SkipLN's two
        operands); ``sum_value`` is the sum's value whose other uses must be kept."""
        if root.domain == CONTRIB_DOMAIN and root.op_type == "SkipLayerNormalization":
            if len(root.inputs) != 4 or any(o.uses() for o in root.outputs[1:3]):
                return None  # a bias input, or mean/inv-std used
            inp, skip, gamma, beta = root.inputs
            total = root.outputs[3] if len(root.outputs) > 3 else None
            eps = root.attributes.get_float("epsilon", 1e-12)
            return [inp, skip], total, gamma, beta, eps, [root]
        if is_op(root, "LayerNormalization"):
            s = root.inputs[0]
            rank = None if s is None or s.shape is None else len(s.shape)
            axis = root.attributes.get_int("axis", -1)
            if rank is None or axis not in (-1, rank - 1) or len(root.inputs) < 3:
                return None
            if any(o.uses() or o.is_graph_output() for o in root.outputs[1:]):
                return None
            if root.attributes.get_int("stash_type", 1) != 1:
                return None
            eps = root.attributes.get_float("epsilon", 1e-5)
            return [s], s, root.inputs[1], root.inputs[2], eps, [root]
        match = matcher.match(root)
        if match is None or match[2] is None:
            return None
        s, gamma, beta, eps, nodes = match
        return [s], s, gamma, beta, eps, list(nodes)

    def _fuse(self, model, graph, root, terms, total, gamma, beta, eps, nodes) -> int:
        """Rewrite one match; 1 when fused, 0 when refused (the reason is logged)."""
        adds: list[ir.Node] = []
        leaves: list[ir.Node] = []
        for term in terms:
            # The final sum of a LayerNorm may have other uses (routed to embedding_sum);
            # every partial sum inside the tree must be private to it.
            if not self._flatten(term, adds, leaves, top=len(terms) == 1):
                logger.debug("%s: not a private sum of Gathers", root.name)
                return 0
        if len(leaves) not in (2, 3):
            return 0
        tables = [self._table(g) for g in leaves]
        if any(t is None for t in tables):
            logger.debug("%s: a Gather is not axis 0 over a constant 2-D table", root.name)
            return 0
        hidden = {t.shape[1] for t in tables}
        dtypes = {leaf.inputs[0].dtype for leaf in leaves}
        if len(hidden) != 1 or len(dtypes) != 1:
            return 0
        (h,) = hidden
        for param in (gamma, beta):
            if param is None or param.shape is None or list(param.shape) != [h]:
                return 0
            if param.dtype not in dtypes:
                return 0
        picked = self._assign(leaves)
        if picked is None:
            logger.debug("%s: no [B, S] ids lookups plus a 0..S-1 position lookup", root.name)
            return 0
        word, seg, pos = picked
        ids = word.inputs[1]
        need_sum = total is not None and (
            total.is_graph_output() or any(u.node not in {*adds, *nodes} for u in total.uses())
        )
        inputs = [
            ids,
            None if seg is None else seg.inputs[1],
            word.inputs[0],
            pos.inputs[0],
            None if seg is None else seg.inputs[0],
            gamma,
            beta,
        ]
        int32 = ir.TensorType(ir.DataType.INT32)
        probe_inputs = [
            None if v is None else ir.Value(name="id", type=int32, shape=v.shape)
            for v in inputs[:2]
        ]
        attrs = [ir.AttrFloat32("epsilon", float(eps))]
        copies = probe_node(CONTRIB_DOMAIN, OP, [*probe_inputs, *inputs[2:]]).inputs
        probe = ir.Node(CONTRIB_DOMAIN, OP, copies, attrs, num_outputs=2)  # 1 output: refused
        if not self.can_emit(probe):
            self.blocked += 1
            return 0
        first = min((n for n in [*leaves, *adds, *nodes]), key=list(graph).index)
        for i in (0, 1):
            if inputs[i] is not None and inputs[i].dtype != ir.DataType.INT32:
                cast = ir.Node("", "Cast", [inputs[i]], [ir.AttrInt64("to", 6)])
                cast.outputs[0].type, cast.outputs[0].shape = int32, inputs[i].shape
                cast.outputs[0].name = f"{inputs[i].name}_int32_{root.name or 'eln'}"
                graph.insert_before(first, cast)
                inputs[i] = cast.outputs[0]
        while inputs[-1] is None:
            inputs.pop()
        node = ir.Node(
            CONTRIB_DOMAIN, OP, inputs, attrs, num_outputs=3 if need_sum else 2, name=root.name
        )
        graph.insert_before(root, node)
        node.outputs[1].name = f"{root.outputs[0].name}_mask_index"
        take_over(root.outputs[0], node.outputs[0])
        if need_sum:
            take_over(total, node.outputs[2])
        position_chain = self._producers(pos.inputs[1])
        graph.remove([*nodes, *adds, *leaves], safe=True)
        self._prune(graph, position_chain)
        model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        logger.debug("fused %s %s (segment: %s)", OP, node.outputs[0].name, seg is not None)
        return 1

    def _assign(self, leaves: list[ir.Node]) -> tuple | None:
        """``(word, segment or None, position)`` Gathers, or None.

        Each lookup is tried as the position one: the others must gather [B, S] ids of one
        shape, and its ids must be 0..S-1 for that S. Word and segment play the same part
        in the sum, so the bigger table is called the vocabulary."""
        for pos in leaves:
            others = sorted(
                (g for g in leaves if g is not pos), key=lambda g: -g.inputs[0].shape[0]
            )
            if not all(self._row_ids(g.inputs[1]) for g in others):
                continue
            ids = others[0].inputs[1]
            if len(others) > 1 and not self._same_dims(others[1].inputs[1], ids):
                continue
            if self._positions_are_arange(pos.inputs[1], ids):
                return others[0], (others[1] if len(others) > 1 else None), pos
        return None

    def _flatten(self, value, adds: list, leaves: list, *, top: bool) -> bool:
        """Collect the Gathers summed into ``value`` through private Adds."""
        node = value.producer() if value is not None else None
        if is_op(node, "Add"):
            if not top and only_use(value) is None:
                return False
            adds.append(node)
            return all(self._flatten(v, adds, leaves, top=False) for v in node.inputs)
        if is_op(node, "Gather") and only_use(value) is not None:
            leaves.append(node)
            return True
        return False

    @staticmethod
    def _table(gather: ir.Node) -> np.ndarray | None:
        """The Gather's table when it is a true constant of rank 2 gathered on axis 0."""
        if gather.attributes.get_int("axis", 0) != 0:
            return None
        table = constant_array(gather.inputs[0])
        if table is None or table.ndim != 2 or table.dtype.kind != "f":
            return None
        return table

    @staticmethod
    def _row_ids(value: ir.Value | None) -> bool:
        """Ids a [B, S] graph-computed tensor (not a constant): token or segment ids."""
        return (
            value is not None
            and value.dtype in ID_TYPES
            and value.shape is not None
            and len(value.shape) == 2
            and constant_array(value) is None
        )

    @staticmethod
    def _same_dims(a: ir.Value, b: ir.Value) -> bool:
        da, db = ir_dims(a), ir_dims(b)
        return (
            da is not None
            and db is not None
            and len(da) == len(db)
            and all(same_dim(x, y) for x, y in zip(da, db, strict=True))
        )

    def _positions_are_arange(self, value: ir.Value | None, ids: ir.Value) -> bool:
        """``value`` is provably ``0..S-1`` ([S] or [1, S]) with S the ids' sequence dim."""
        node = value.producer() if value is not None else None
        if is_op(node, "Slice"):
            data = constant_array(node.inputs[0])
            if data is None or data.ndim not in (1, 2) or (data.ndim == 2 and data.shape[0] != 1):
                return False
            flat = data.reshape(-1)
            if flat.size < 2 or not np.array_equal(flat, np.arange(flat.size)):
                return False  # (size 1 would broadcast over any S)
            starts = _int_const(node.inputs[1])
            axes = _int_const(node.inputs[3]) if len(node.inputs) > 3 else None
            steps = _int_const(node.inputs[4]) if len(node.inputs) > 4 else [1]
            axis_ok = axes in ([data.ndim - 1], [-1]) or (axes is None and data.ndim == 1)
            if starts != [0] or steps != [1] or not axis_ok:
                return False
            return self._is_seq_len(node.inputs[2], ids, scalar=False)
        if is_op(node, "Unsqueeze"):
            axes = _int_const(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes not in ([0], None) or node.attributes.get("axes") is not None:
                return False
            node = producer(node.inputs[0], "Range")
        if is_op(node, "Range"):
            start, delta = _int_const(node.inputs[0]), _int_const(node.inputs[2])
            limit = node.inputs[1]
            return start == [0] and delta == [1] and self._is_seq_len(limit, ids, scalar=True)
        return False

    def _is_seq_len(self, value: ir.Value | None, ids: ir.Value, *, scalar: bool) -> bool:
        """``value`` is ``S`` (a scalar, or a [1] tensor when not ``scalar``) read by Shape
        from a tensor whose read dim is the ids' dim 1."""
        node = value.producer() if value is not None else None
        if not scalar and is_op(node, "Unsqueeze"):
            axes = _int_const(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes != [0]:
                return False
            node = node.inputs[0].producer()
            scalar = True
        if is_op(node, "Gather"):
            index = _int_const(node.inputs[1])
            idx_shape = node.inputs[1].shape
            if index is None or len(index) != 1 or node.attributes.get_int("axis", 0) != 0:
                return False
            if idx_shape is None or len(idx_shape) != (0 if scalar else 1):
                return False
            shape_node = producer(node.inputs[0], "Shape")
            if shape_node is None or shape_node.attributes.get("start") is not None:
                return False
            return self._dim_is_seq(shape_node.inputs[0], index[0], ids)
        if not scalar and is_op(node, "Shape"):
            source = node.inputs[0]
            if source.shape is None:
                return False
            rank = len(source.shape)
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", rank)
            start, end = (min(max(x + rank if x < 0 else x, 0), rank) for x in (start, end))
            return end - start == 1 and self._dim_is_seq(source, start, ids)
        return False

    def _dim_is_seq(self, source: ir.Value, dim: int, ids: ir.Value) -> bool:
        """Dim ``dim`` of ``source`` is provably dim 1 of the [B, S] ``ids``."""
        dims = ir_dims(source)
        if dims is None or not -len(dims) <= dim < len(dims):
            return False
        dim %= len(dims)
        if source is ids:
            return dim == 1
        ids_dims = ir_dims(ids)
        return ids_dims is not None and same_dim(dims[dim], ids_dims[1])

    @staticmethod
    def _producers(value: ir.Value | None) -> list[ir.Node]:
        """Nodes upstream of the position ids, nearest first (pruned when left unused)."""
        found, stack = [], [value]
        while stack:
            v = stack.pop()
            node = None if v is None else v.producer()
            if node is None or node in found or not is_op(node, *_POSITION_OPS):
                continue
            found.append(node)
            stack.extend(node.inputs)
        return found

    @staticmethod
    def _prune(graph: ir.Graph, nodes: list[ir.Node]) -> None:
        """Remove the position-id nodes that nothing uses any more (nearest first)."""
        for node in nodes:
            if node.graph is graph and not any(
                o.uses() or o.is_graph_output() for o in node.outputs
            ):
                graph.remove(node, safe=True)


_POSITION_OPS = ("Slice", "Range", "Unsqueeze", "Gather", "Shape")
