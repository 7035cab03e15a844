"""Fuse decoder self-attention over a KV cache into one ``com.microsoft`` MultiHeadAttention.

GPT-2-style decoders exported with past key/values (optimum's export, torch's SDPA symbolic)
compute, per layer and after ``fold_shapes``/``fold_constants`` have made the scale and the
head-split shapes constant::

    before:  q4 = Transpose<0,2,1,3>(Reshape(q3, [B, S, H, D]))          (k4, v4 alike)
             present_k = Concat<axis=2>(past_k, k4)     present_v = Concat(past_v, v4)
             s = MatMul(Mul(q4, c), Mul(Transpose<0,1,3,2>(present_k), c))   (scale c*c)
             p = Softmax<axis=-1>(Add(s, bias))         bias = Where(mask, 0, -inf)
             p = Where(IsNaN(p), 0, p)                  (SDPA's guard; absent in eager)
             y = Reshape(Transpose<0,2,1,3>(MatMul(p, present_v)), [B, S, H*D])
    after:   o = MultiHeadAttention<num_heads=H, scale=c*c>(q3, present_k, present_v,
                                                             attention_bias=bias)
             y = Where(IsNaN(o), 0, o)                  (only when the guard was there)

The math is unchanged: ``y[b, s, h*D:(h+1)*D] = softmax(q.k^T * scale + bias) . v`` per head.
MultiHeadAttention takes the key and value as 4D ``(B, H, T, D)`` tensors, so the cache
``Concat`` nodes stay exactly as they were: ``present.N.key/value`` remain graph outputs with
their shapes, and the mask's ``Slice`` (which reads ``Shape(present_k)``) keeps its input. (Had
the fused op produced the present tensors itself, that Shape -> Slice -> bias chain would
become a cycle.) The causal part and the ``attention_mask`` padding both live in ``bias``,
which is passed through as computed, so left padding, holes and any other mask stay exact.

Fully masked rows: softmax of an all ``-inf`` row is NaN; the SDPA export zeroes those
probabilities. ORT's MultiHeadAttention returns NaN for the whole row of that head (seen on
CPU with ORT 1.31), so the guard moves to the output, where it zeroes the same rows. It
differs from the original only when ``v`` itself holds NaN (then the original row is NaN,
the fused one 0).

Accepted variants: the scale as a constant scalar ``Mul``/``Div`` on q, on k^T, both, or on
the scores; the bias ``Add`` in either operand order, or no bias; key/value with or without a
cache ``Concat``; the head split/merge shapes as constants or as ``Concat(Unsqueeze(Gather(
Shape(x), i)), ..)``. Checks: every scale factor is a true constant scalar; Softmax is over
the last axis; ``H * D`` equals q's hidden size and the key/value have ``H`` heads of size
``D`` (static dims); the bias is 4D and never broadcast over the query or key length; every
intermediate is private to the pattern and no graph output.

Which op: MultiHeadAttention when ``self.target`` allows contrib ops and ``supports`` the node
(ORT CPU/CUDA). Otherwise (target ``portable``), from opset 23 the standard ``Attention``
takes the 4D ``q4``, key, value and the bias as ``attn_mask`` and replaces the scores ..
``MatMul(p, v)`` core only (q's head split and the merge stay around it). ORT 1.31's CPU
kernel returns 0 for fully masked rows itself: for a ``cpu`` target, where that is probed
(``Target.zeroes_fully_masked_attention``), the guard goes (two nodes per layer, ~3% of a
SmolLM2 int4 decode step); elsewhere it stays, for runtimes that give NaN.
Below opset 23 such matches are counted in ``blocked`` and left as they are.

Grouped-query attention (Llama, Mistral, SmolLM: ``Hkv`` KV heads shared by groups of
``n = H / Hkv`` query heads): K and V reach the scores through transformers' ``repeat_kv``
(``Reshape(Expand(Unsqueeze(present, 2)))``, proven in ``_repeat_kv.py``). Only the standard
``Attention`` (23) takes KV heads shared by query groups, so that is what these become, from
the 4D (rotated) q and the un-repeated ``present`` key/value (query head ``h`` reads KV head
``h // n``, the repeat's order); the repeat goes. A ``Shape`` of a repeated tensor (the mask's
``Slice`` reads the key length from it) is pointed at the ``present`` tensor, which has the
same dims but the head count (only dims 0, 2, 3 may be read). MultiHeadAttention cannot take
them (it needs as many KV heads as query heads) and ORT's GroupQueryAttention refuses batch
> 1 with a past and more than one new token, an input the export accepts; ``raise_opset``'s
decoder rule raises such models to 23.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import (
    NON_DETERMINISTIC_OPS,
    constant_array,
    is_standard,
    replace_value,
)
from graph_passes.fusion import Emits, ExpectedRow, Fusion
from graph_passes.fusions import _attention_match as am
from graph_passes.fusions._repeat_kv import repeat_kv
from graph_passes.match import is_op, probe_node, producer
from graph_passes.shapes import infer_shapes, symbolic_dims
from graph_passes.target.targets import CONTRIB_DOMAIN

logger = logging.getLogger(__name__)

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
TO_HEADS = (0, 2, 1, 3)  # (B, S, H, D) <-> (B, H, S, D)
KEY_T = (0, 1, 3, 2)  # (B, H, T, D) -> (B, H, D, T)


class _Reject(Exception):
    """A Softmax that looked like attention but cannot be proven to be one we can fuse."""


@dataclass
class _Match:
    q3: ir.Value | None  # (B, S, H*D); None: only the standard Attention (4D q) fits
    key: ir.Value  # (B, H, T, D)
    value: ir.Value  # (B, H, T, D)
    bias: ir.Value | None  # (B|1, H|1, S, T), additive
    scale: float
    heads: int
    zero: ir.Value | None  # the guard's 0 when the SDPA NaN guard is present
    out: ir.Value  # (B, S, H*D): the merged heads
    nodes: list[ir.Node] = field(default_factory=list)
    q4: ir.Value | None = None  # (B, H, S, D): for the standard Attention
    heads_out: ir.Value | None = None  # (B, H, S, D): MatMul(p, v), for the standard Attention
    core: list[ir.Node] = field(default_factory=list)  # nodes the standard Attention replaces
    groups: int = 1  # query heads per KV head (grouped-query attention: standard op only)
    rewire: list = field(default_factory=list)  # (Shape of a repeated KV, the KV tensor)


class FuseDecoderAttention(Fusion):
    """Q/K^T/Softmax/V with a KV cache -> com.microsoft MultiHeadAttention (4D key/value)."""

    name: ClassVar[str] = "fuse_decoder_attention"
    position: ClassVar[int] = 80
    emits: ClassVar[Emits] = Emits(
        contrib=frozenset({"MultiHeadAttention"}),
        cuda=frozenset({"MultiHeadAttention"}),
        standard={"Attention": 23},
    )
    shadows: ClassVar[tuple[str, ...]] = ("AttentionFusion",)
    expected: ClassVar[ExpectedRow] = ExpectedRow("attention", am.ATTENTION_OPS)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.blocked = 0  # matched, but the target cannot run the fused op
        self.declined = 0  # matched, but every fused form is measured slower on the target
        self.rejected: list[str] = []  # why attention-like Softmaxes were left, for reports
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        infer_shapes(model)
        self._model, self._symbolic_table = model, None
        for graph in model.graphs():
            for softmax in list(graph):
                if softmax.op_type != "Softmax" or not is_standard(softmax):
                    continue
                try:
                    match = self._match(softmax)
                except _Reject as reason:
                    self.rejected.append(f"{softmax.name}: {reason}")
                    logger.debug("attention at %s not fused: %s", softmax.name, reason)
                    continue
                if match is not None:
                    self._rewrite(graph, match)
        if any(n.domain == CONTRIB_DOMAIN for g in model.graphs() for n in g):
            model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        if self.blocked:
            logger.info(
                "%d attention patterns left: target %s cannot run them",
                self.blocked,
                self.target.name,
            )
        return self.result(model)

    # -- matching -----------------------------------------------------------------------------

    def _match(self, softmax: ir.Node) -> _Match | None:
        """The attention around ``softmax``; None when it is no attention at all."""
        scores, bias = softmax.inputs[0], None
        add = producer(scores, "Add")
        nodes: list[ir.Node] = []
        if add is not None:
            for s, b in (add.inputs, add.inputs[::-1]):
                if producer(s, "MatMul", "Mul", "Div") is not None and _scores(s) is not None:
                    scores, bias = s, b
                    nodes.append(add)
                    break
        found = _scores(scores)
        if found is None:
            return None
        q4, key_t, scale, score_nodes = found
        nodes += score_nodes
        transpose_k = producer(key_t, "Transpose")
        if transpose_k is None:
            if producer(key_t, "Mul", "Div") is not None and producer(q4, "Mul", "Div"):
                raise _Reject("q and k are scaled by a non-constant (run fold_constants first)")
            return None  # e.g. a classifier's MatMul by a weight: no attention
        if _perm(transpose_k) != KEY_T:
            raise _Reject("k^T is not Transpose<0,1,3,2> of a (B, H, T, D) key")
        key = transpose_k.inputs[0]
        nodes.append(transpose_k)
        rank = len(softmax.inputs[0].shape) if softmax.inputs[0].shape is not None else None
        # Before opset 13 the default axis was 1 (and the input was coerced to 2D at the
        # axis, which for the last axis is the same softmax).
        opset = softmax.version or self._opset
        axis = softmax.attributes.get_int("axis", -1 if opset >= 13 else 1)
        if not (axis == -1 or (rank == 4 and axis == 3)):
            raise _Reject("Softmax is not over the last axis")
        nodes.append(softmax)
        probs, zero = softmax.outputs[0], None
        guard = _nan_guard(softmax)
        if guard is not None:
            zero, guard_nodes = guard
            nodes += guard_nodes
            probs = guard_nodes[-1].outputs[0]
        uses = list(probs.uses())
        attend = uses[0].node if len(uses) == 1 else None
        if not is_op(attend, "MatMul") or attend.inputs[0] is not probs:
            raise _Reject("probabilities do not feed one MatMul with V")
        value = attend.inputs[1]
        nodes.append(attend)
        key, value, groups, repeat_nodes, rewire = self._grouped(key, value)
        nodes += repeat_nodes
        q3 = merge = None
        keep: set[ir.Node] = set()
        if groups == 1:  # MultiHeadAttention's form (3D q in, merged 3D out) is required
            q3, merge, heads, keep = self._split_and_merge(q4, attend, key, value)
        else:  # grouped: only the standard Attention (4D q and output; split/merge stay)
            heads = self._grouped_heads(q4, key, value, groups)
        if merge is not None:
            nodes += list(keep)  # the split and merge go too when MHA replaces them
        if bias is not None:
            self._check_bias(bias, q4 if q3 is None else q3, key, seq_axis=2 if q3 is None else 1)
        last = attend if merge is None else merge
        self._check_private(nodes, last, allowed={n for n, _ in rewire})
        if not (q4.dtype in FLOAT_TYPES and key.dtype == q4.dtype and value.dtype == q4.dtype):
            raise _Reject(f"q/k/v dtypes {q4.dtype}/{key.dtype}/{value.dtype} not one float type")
        if bias is not None and bias.dtype != q4.dtype:
            raise _Reject("bias dtype differs from q")
        core = [n for n in nodes if n not in keep]
        nodes = sorted(set(nodes), key=nodes.index)
        return _Match(
            q3,
            key,
            value,
            bias,
            scale,
            heads,
            zero,
            attend.outputs[0] if merge is None else merge.outputs[0],
            nodes,
            q4,
            attend.outputs[0],
            core,
            groups,
            rewire,
        )

    def _grouped(self, key: ir.Value, value: ir.Value):
        """``(key, value, groups, repeat_nodes, rewire)``: the KV tensors under a
        ``repeat_kv`` (grouped-query attention), or the inputs themselves with ``groups`` 1.

        ``rewire``: ``(Shape node, kv)`` for each Shape that reads a repeated tensor (the mask's
        Slice reads the key length from it); it will read the KV tensor instead, which has the
        same dims except the head count, which no reader may take."""
        k_rep, v_rep = repeat_kv(key), repeat_kv(value)
        if k_rep is None and v_rep is None:
            return key, value, 1, [], []
        if k_rep is None or v_rep is None or k_rep.groups != v_rep.groups:
            raise _Reject("key and value are not repeated for the same query groups")
        rewire = []
        for repeated, found in ((key, k_rep), (value, v_rep)):
            for use in repeated.uses():
                node = use.node
                if node in (found.nodes[-1],) or is_op(node, "Transpose", "MatMul"):
                    continue
                if not is_op(node, "Shape") or node.attributes or not _reads_dims(node, (0, 2, 3)):
                    raise _Reject("a repeated key/value is used outside the attention")
                rewire.append((node, found.kv))
        return k_rep.kv, v_rep.kv, k_rep.groups, k_rep.nodes + v_rep.nodes, rewire

    def _split_and_merge(self, q4: ir.Value, attend: ir.Node, key: ir.Value, value: ir.Value):
        """``(q3, merge, heads, nodes)``: q's head split and the output's head merge, which
        MultiHeadAttention takes over (3D q in, 3D output)."""
        merge_t = _only_consumer(attend.outputs[0], "Transpose")
        merge = None if merge_t is None else _merge_reshape(merge_t.outputs[0])
        if merge is None or _perm(merge_t) != TO_HEADS:
            raise _Reject("attention output is not Transpose<0,2,1,3> then Reshape")
        merged = _merges_heads(merge, merge_t.outputs[0])
        if merged is None:
            raise _Reject("the merging Reshape does not give (B, S, H*D)")
        split_t = producer(q4, "Transpose")
        split = None if split_t is None else producer(split_t.inputs[0], "Reshape")
        if split is None or _perm(split_t) != TO_HEADS:
            raise _Reject("q is not Reshape to heads then Transpose<0,2,1,3>")
        q3 = split.inputs[0]
        if split.attributes.get_int("allowzero", 0) != 0:
            raise _Reject("q's head split Reshape has allowzero=1")
        heads, _ = self._heads(q3, split, key, value)
        # The merge's own shape math (Shape of the transposed heads) goes with it.
        return q3, merge, heads, {merge_t, *merged, merge, split_t, split}

    def _grouped_heads(self, q4: ir.Value, key: ir.Value, value: ir.Value, groups: int) -> int:
        """Query heads of a 4D ``q4`` (B, H, S, D) whose key/value have ``H / groups`` heads
        of size D, all static: what the standard Attention needs."""
        dims = list(q4.shape) if q4.shape is not None else None
        if dims is None or len(dims) != 4 or not isinstance(dims[1], int):
            dims = self._symbolic().get(q4.name or "", dims)  # ONNX gave up at a Reshape -1
        if dims is None or len(dims) != 4:
            raise _Reject("q is not a 4D (B, H, S, D) tensor")
        heads, size = dims[1], dims[3]
        if not (isinstance(heads, int) and isinstance(size, int)) or heads % groups:
            raise _Reject("q's heads and head size are not static")
        for name, v in (("key", key), ("value", value)):
            if v.shape is None or len(v.shape) != 4:
                raise _Reject(f"{name} rank is not 4")
            if _dim(v, 1) != heads // groups or _dim(v, 3) != size:
                raise _Reject(f"{name} is not (B, {heads // groups}, T, {size}) with static dims")
        return heads

    def _heads(self, q3: ir.Value, split: ir.Node, key: ir.Value, value: ir.Value):
        """``(H, D)`` from the head-split Reshape, checked against q, k and v's static dims."""
        target, _ = _shape_pieces(split.inputs[1], q3)
        hidden = _dim(q3, -1)
        if target is None or len(target) != 4 or q3.shape is None or len(q3.shape) != 3:
            raise _Reject("q's head split is not (B, S, H, D) of a (B, S, H*D) tensor")
        if target[0] != "keep0" or target[1] != "keep1":
            raise _Reject("q's head split does not keep batch and sequence")
        heads, head_dim = target[2], target[3]
        if not isinstance(hidden, int):
            raise _Reject("q's hidden size is not static")
        if heads == -1 and isinstance(head_dim, int) and head_dim > 0 and hidden % head_dim == 0:
            heads = hidden // head_dim
        if head_dim == -1 and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
            head_dim = hidden // heads
        if not (isinstance(heads, int) and isinstance(head_dim, int) and heads > 0):
            raise _Reject("heads and head size are not constants")
        if heads * head_dim != hidden:
            raise _Reject(f"{heads} heads x {head_dim} != hidden size {hidden}")
        for name, v in (("key", key), ("value", value)):
            if v.shape is None or len(v.shape) != 4:
                raise _Reject(f"{name} rank is not 4")
            if _dim(v, 1) != heads or _dim(v, 3) != head_dim:
                raise _Reject(f"{name} is not (B, {heads}, T, {head_dim}) with static dims")
        return heads, head_dim

    def _symbolic(self) -> dict:
        """ORT's symbolic shapes of the model (computed once per call, only when needed)."""
        if self._symbolic_table is None:
            self._symbolic_table = symbolic_dims(self._model)
        return self._symbolic_table

    def _check_bias(self, bias: ir.Value, q: ir.Value, key: ir.Value, seq_axis: int = 1) -> None:
        if bias.shape is None or len(bias.shape) != 4:
            raise _Reject("bias is not 4D (MultiHeadAttention needs (B|1, H|1, S, T))")
        if _dim(bias, 2) == 1 and _dim(q, seq_axis) != 1:
            raise _Reject("bias broadcasts over the query length")
        if _dim(bias, 3) == 1 and _dim(key, 2) != 1:
            raise _Reject("bias broadcasts over the key length")

    def _check_private(self, nodes: list[ir.Node], last: ir.Node, allowed=frozenset()) -> None:
        inside = set(nodes) | set(allowed)
        for node in nodes:
            if node.graph is not last.graph or not is_standard(node):
                raise _Reject("nodes span graphs or domains")
            if node is last:
                continue
            for out in node.outputs:
                if out.is_graph_output() or any(u.node not in inside for u in out.uses()):
                    raise _Reject(f"intermediate {out.name} is used outside the attention")

    # -- rewriting ----------------------------------------------------------------------------

    def _rewrite(self, graph: ir.Graph, m: _Match) -> None:
        """MultiHeadAttention where the target has it, else standard Attention (opset 23)."""
        inputs: list[ir.Value | None] = [m.q3, m.key, m.value]
        if m.bias is not None:
            inputs += [None, None, m.bias]
        attrs = [ir.AttrInt64("num_heads", m.heads), ir.AttrFloat32("scale", m.scale)]
        declined = self.declined
        mha_fits = m.q3 is not None and m.groups == 1  # MHA takes neither a 4D q nor groups
        mha = probe_node(CONTRIB_DOMAIN, "MultiHeadAttention", inputs, attrs) if mha_fits else None
        # 4D in and out (B, H, S, D) for the standard op: q's head split and the merge stay.
        std_inputs = [m.q4, m.key, m.value] + ([m.bias] if m.bias is not None else [])
        std_attrs = [ir.AttrFloat32("scale", m.scale)]
        if (
            mha_fits
            and self.target.allows_contrib
            and self.can_emit(mha)
            and self._pays(m.nodes, m.out, mha)
        ):
            mha = ir.Node(CONTRIB_DOMAIN, "MultiHeadAttention", inputs, attrs)
            self._replace(graph, m.out, mha, m.nodes, m.zero)
            kind = "MultiHeadAttention"
        elif self.can_emit_standard("Attention", self._opset) and self._pays(
            m.core, m.heads_out, probe_node("", "Attention", std_inputs, std_attrs)
        ):
            std = ir.Node("", "Attention", std_inputs, std_attrs)
            for shape_node, kv in m.rewire:  # same dims but the head count, which none reads
                shape_node.replace_input_with(0, kv)
            zeroed = self.target.zeroes_fully_masked_attention  # then the guard is identity
            self._replace(graph, m.heads_out, std, m.core, None if zeroed else m.zero)
            kind = "Attention"
        else:
            self.blocked += self.declined == declined
            logger.debug("attention at %s blocked by target %s", m.out.name, self.target.name)
            return
        self.matches += 1
        logger.debug("fused %s into %s (%d heads, scale %g)", m.out.name, kind, m.heads, m.scale)

    def _pays(self, nodes, out: ir.Value, probe: ir.Node) -> bool:
        """Whether the target does not measure ``probe`` slower than ``nodes`` (-> ``out``)."""
        if self.rewrite_pays(nodes, [out], [probe], [probe.outputs[0]]):
            return True
        self.declined += 1
        return False

    def _replace(self, graph, old: ir.Value, node: ir.Node, nodes, zero) -> None:
        """Put ``node`` (plus the NaN guard when ``zero``) in place of ``nodes``, whose last
        output is ``old``."""
        last = old.producer()  # every input of the fused op precedes it
        assert last is not None
        node.name = last.name
        result = node.outputs[0]
        result.type, result.shape = old.type, old.shape
        new_nodes = [node]
        if zero is not None:
            isnan = ir.Node("", "IsNaN", [result], name=f"{last.name}/nan")
            where = ir.Node(
                "", "Where", [isnan.outputs[0], zero, result], name=f"{last.name}/nan_to_zero"
            )
            new_nodes += [isnan, where]
            result = where.outputs[0]
            result.type, result.shape = old.type, old.shape
        graph.insert_before(last, new_nodes)
        name = old.name
        # ``result`` is a fresh output in ``old``'s graph, so ``can_replace`` always holds.
        replace_value(old, result)
        result.name = name
        removed_inputs = [v for n in nodes for v in n.inputs if v is not None]
        graph.remove(nodes, safe=True)
        _prune(graph, removed_inputs)


# -- helpers --------------------------------------------------------------------------------------


def _reads_dims(shape_node: ir.Node, allowed: tuple[int, ...]) -> bool:
    """Whether every reader of ``Shape(x)`` (x 4D) is a Gather of one dim in ``allowed``."""
    for use in shape_node.outputs[0].uses():
        gather = use.node
        index = constant_array(gather.inputs[1]) if is_op(gather, "Gather") else None
        if index is None or index.ndim != 0 or gather.attributes.get_int("axis", 0) != 0:
            return False
        if int(index) % 4 not in allowed:
            return False
    return not shape_node.outputs[0].is_graph_output()


def _only_consumer(value: ir.Value, *ops: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    return node if is_op(node, *ops) and node.inputs[0] is value else None


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    perm = node.attributes.get_ints("perm", None)
    return None if perm is None else tuple(perm)


def _dim(value: ir.Value, axis: int):
    if value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    return value.shape[axis]


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1 or array.ndim > 1:
        return None
    number = float(array.reshape(-1)[0])
    return number if np.isfinite(number) and number != 0 else None


def _unscale(value: ir.Value) -> tuple[ir.Value, float, list[ir.Node]]:
    """Peel ``Mul(x, c)``/``Mul(c, x)``/``Div(x, c)`` by a constant scalar off ``value``."""
    node = value.producer()
    if is_op(node, "Mul"):
        for x, c in (node.inputs, node.inputs[::-1]):
            factor = _scalar(c)
            if factor is not None:
                return x, factor, [node]
    if is_op(node, "Div"):
        divisor = _scalar(node.inputs[1])
        if divisor is not None:
            return node.inputs[0], 1.0 / divisor, [node]
    return value, 1.0, []


def _scores(value: ir.Value) -> tuple[ir.Value, ir.Value, float, list[ir.Node]] | None:
    """``(q4, k^T, scale, nodes)`` when ``value`` is ``scale * MatMul(q4, k^T)``."""
    inner, post, nodes = _unscale(value)
    matmul = producer(inner, "MatMul")
    if matmul is None:
        return None
    q4, sq, q_nodes = _unscale(matmul.inputs[0])
    key_t, sk, k_nodes = _unscale(matmul.inputs[1])
    return q4, key_t, float(np.float32(post * sq * sk)), [*nodes, matmul, *q_nodes, *k_nodes]


def _nan_guard(softmax: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """``(zero, [IsNaN, Where])`` when the probabilities go through ``Where(IsNaN(p), 0, p)``."""
    probs = softmax.outputs[0]
    uses = list(probs.uses())
    if len(uses) != 2:
        return None
    isnan = next((u.node for u in uses if is_op(u.node, "IsNaN")), None)
    if isnan is None:
        return None
    where = _only_consumer(isnan.outputs[0], "Where")
    if where is None or where.inputs[2] is not probs:
        return None
    zero = constant_array(where.inputs[1])
    if zero is None or zero.size != 1 or zero.ndim > 1 or float(zero.reshape(-1)[0]) != 0.0:
        return None
    return where.inputs[1], [isnan, where]


def _shape_pieces(shape: ir.Value, source: ir.Value) -> tuple[list | None, list[ir.Node]]:
    """The target of a Reshape of ``source`` as a list: int, -1, or ``"keepI"``; and the
    nodes that computed it (Concat/Unsqueeze/Gather/Shape; empty for a constant).

    ``keepI`` means the entry is provably ``source``'s dim I: a constant 0 (Reshape copies the
    dim, allowzero unset) or ``Unsqueeze(Gather(Shape(x), I))`` where ``x`` has the same dim I
    as ``source`` (``x`` is ``source`` or a sibling output of the Split that made it).
    """
    array = constant_array(shape)
    if array is not None:
        return [_piece(int(d), i, source) for i, d in enumerate(array.reshape(-1))], []
    concat = producer(shape, "Concat")
    if concat is None or concat.attributes.get_int("axis", 0) != 0:
        return None, []
    pieces: list = []
    nodes: list[ir.Node] = [concat]
    for piece in concat.inputs:
        array = constant_array(piece)
        if array is not None:
            pieces += [
                _piece(int(d), len(pieces) + i, source) for i, d in enumerate(array.reshape(-1))
            ]
            continue
        unsqueeze = producer(piece, "Unsqueeze")
        gather = None if unsqueeze is None else producer(unsqueeze.inputs[0], "Gather")
        shape_of = None if gather is None else producer(gather.inputs[0], "Shape")
        index = None if gather is None else constant_array(gather.inputs[1])
        if shape_of is None or index is None or index.size != 1 or shape_of.attributes:
            return None, []
        i = int(index.reshape(-1)[0])
        axes = constant_array(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
        if axes is None:  # opset < 13: axes is an attribute
            axes = np.asarray(unsqueeze.attributes.get_ints("axes", []))
        if (
            index.ndim != 0
            or axes.reshape(-1).tolist() != [0]
            or gather.attributes.get_int("axis", 0)
        ):
            return None, []
        if i != len(pieces) or not _same_leading_dim(shape_of.inputs[0], source, i):
            return None, []
        pieces.append(f"keep{i}")
        nodes += [unsqueeze, gather, shape_of]
    return pieces, nodes


def _piece(d: int, i: int, source: ir.Value) -> int | str:
    """A constant Reshape entry: 0 copies dim ``i``, as does ``source``'s own static dim."""
    return f"keep{i}" if d == 0 or (d > 0 and _dim(source, i) == d) else d


def _same_leading_dim(x: ir.Value, source: ir.Value, axis: int) -> bool:
    """Whether ``x`` provably has ``source``'s dim ``axis`` (itself, or a Split sibling)."""
    if x is source:
        return True
    split = source.producer()
    if not is_op(split, "Split") or x.producer() is not split:
        return False
    split_axis = split.attributes.get_int("axis", 0)
    rank = None if source.shape is None else len(source.shape)
    return rank is not None and split_axis % rank != axis


def _merge_reshape(heads: ir.Value) -> ir.Node | None:
    """The Reshape of ``heads``, which may also feed Shape nodes (of that Reshape's shape)."""
    if heads.is_graph_output():
        return None
    reshapes = [u.node for u in heads.uses() if is_op(u.node, "Reshape") and u.idx == 0]
    others = [u.node for u in heads.uses() if u.node not in reshapes]
    if len(reshapes) != 1 or not all(is_op(n, "Shape") for n in others):
        return None
    return reshapes[0]


def _merges_heads(merge: ir.Node, heads: ir.Value) -> list[ir.Node] | None:
    """The shape nodes of ``Reshape(heads (B, S, H, D), shape)`` when it is (B, S, H*D)."""
    if merge.attributes.get_int("allowzero", 0) != 0:
        return None
    pieces, nodes = _shape_pieces(merge.inputs[1], heads)
    if pieces is None or len(pieces) != 3 or pieces[:2] != ["keep0", "keep1"]:
        return None
    hidden = None
    if heads.shape is not None and len(heads.shape) == 4:
        h, d = heads.shape[2], heads.shape[3]
        hidden = h * d if isinstance(h, int) and isinstance(d, int) else None
    if not (pieces[2] == -1 or (hidden is not None and pieces[2] == hidden)):
        return None
    # Shape math of the heads must be private to the merge (it is removed with it).
    shapes = {n for n in nodes if n.op_type == "Shape" and n.inputs[0] is heads}
    extra = {u.node for u in heads.uses() if u.node is not merge}
    return nodes if extra <= shapes else None


def _prune(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove producers of ``values`` left without uses (the head split/merge shape math),
    and initializers of this graph that only the removed nodes read (the scale)."""
    stack = list(values)
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None:
            unused = not value.uses() and not value.is_graph_input()
            if unused and not value.is_graph_output() and value.is_initializer():
                if graph.initializers.get(value.name) is value:
                    del graph.initializers[value.name]
            continue
        if node.graph is not graph or not is_standard(node):
            continue
        if node.op_type in NON_DETERMINISTIC_OPS:
            continue
        if any(len(out.uses()) or out.is_graph_output() for out in node.outputs):
            continue
        stack += [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
