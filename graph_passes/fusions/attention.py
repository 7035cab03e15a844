"""Fuse the scaled-dot-product attention of encoders (BERT-like, ViT) into one attention op.

What the optimum, legacy-torch (eager and SDPA) and dynamo-torch exporters emit, per layer::

    before:  q = X @ Wq + bq    k = X @ Wk + bk    v = X @ Wv + bv         (X: [B, S, E])
             qh = heads(q) [* c1]      [B, H, S, D]   (Reshape/Transpose chains, any spelling)
             kt = heads(k)^T [* c2]    [B, H, D, S]
             p  = Softmax(qh @ kt [/ c3] [+ bias], axis=-1)
             y  = merge(p @ heads(v))  [B, S, E]
    after (target cpu/cuda):
             y = com.microsoft.Attention<num_heads=H>(X, [Wq|Wk|Wv], [bq|bk|bv], mask_index)
        or   y = com.microsoft.MultiHeadAttention<num_heads=H>(q, k, v, key_padding_mask=mask)
    after (target portable, opset >= 23):
             y = Attention<q_num_heads=H, kv_num_heads=H>(q, k, v, attn_mask=bias)

The math: ``y = concat_h softmax(alpha * q_h k_h^T + bias) v_h`` with ``alpha = c1 * c2 / c3``;
``scale=alpha`` is written only when it is not ``1/sqrt(D)`` (SDPA exports put
``sqrt(1/sqrt(D))`` on q and k each; their product is checked, not assumed).

Masks. The bias exporters add is ``(1 - m) * fill`` (eager) or
``Where(bool(1 - m), fill, 1 - m)`` (SDPA, optimum), with ``m`` the 2-D ``attention_mask``
broadcast to ``[B, 1, 1|S, S]``. For contrib ops the fused node gets the RAW mask (cast to int32
once, shared by all layers) with ``mask_filter_value=fill``: ORT adds exactly ``fill`` where the
mask is 0, as the original did, so any mask -- right or left padding, holes, even rows with no
key at all (uniform weights in both) -- gives the same result. Masks are never turned into
sequence lengths (ORT's own optimizer does, and is wrong for left padding). A bias that cannot
be proven to come from a 2-D mask is refused on cpu/cuda; the portable ``Attention`` takes any
additive float bias, so it gets the original bias tensor as ``attn_mask`` (expanded to a full
query axis, which ORT's kernel requires). Known difference there: for a query whose keys are
ALL masked, ORT's standard Attention returns zeros where the original gives uniform weights.
The 0/1 contract of attention masks is assumed: a mask value other than 0/1 is not reproduced.

Which contrib op: the packed ``Attention`` (one [E, 3E] GEMM instead of three, and the op ORT's
own optimizer emits, so quantization and providers know it) when Q, K and V are projected from
the same X with constant weights and private projections (a bias that ``remove_noops`` dropped
is packed as zeros); otherwise ``MultiHeadAttention`` on the projected q, k, v. On MiniLM (CPU,
one thread, noisy shared machine) the two were within noise of each other (ratios 0.86-1.07
either way across batch 1-4, sequence 32-128); ``contrib_op="MultiHeadAttention"`` forces MHA.

Q/K/V already packed, ``Split(X @ [Wq|Wk|Wv] [+ b])`` [+ bq ...] (what ``fuse_packed_matmuls``
writes, or a module with one ``in_proj`` weight), are read as column blocks of that weight, so
the fusion does not depend on which of the two passes ran first.

Checks (each rejection is logged with its reason): Softmax over the last axis; every
Reshape/Transpose on the way proven to produce the exact head layout (so head count and size
must agree with the projections' width, see ``_attention_match``); scale factors are
one-element constants; Q, K and V come from the same hidden states X (self-attention); packed
weights/biases are true constants of shapes [E_in, E] and [E]; every intermediate (up to the
projections for the packed op) is used only inside the pattern -- except by ``Shape`` nodes
whose results only feed the pattern's own reshapes (dynamo exports read K's shape that way),
which are removed with it; the emitted node is one the target can run.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import (
    NON_DETERMINISTIC_OPS,
    can_replace,
    is_standard,
    replace_value,
)
from graph_passes.fusion import Emits, ExpectedRow, Fusion
from graph_passes.fusions import _attention_match as am
from graph_passes.shapes import SHAPE_OPS, infer_shapes
from graph_passes.target.targets import CONTRIB_DOMAIN

logger = logging.getLogger(__name__)

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
CONTRIB_OPS = ("Attention", "MultiHeadAttention")
# How much faster (in fused / unfused time) another attention form must measure to be taken
# over the preferred one.
PREFERENCE = 0.05


class Rejected(Exception):
    """A matched attention that must not be fused; the message says why."""


class FuseAttention(Fusion):
    """Q/K/V projections + head split + scaled softmax + merge -> one attention node."""

    name: ClassVar[str] = "fuse_attention"
    position: ClassVar[int] = 70
    runs_after: ClassVar[tuple[str, ...]] = ("raise_opset",)
    emits: ClassVar[Emits] = Emits(
        contrib=frozenset({"Attention", "MultiHeadAttention"}),
        cuda=frozenset({"Attention", "MultiHeadAttention"}),
        standard={"Attention": 23},
    )
    shadows: ClassVar[tuple[str, ...]] = ("AttentionFusion",)
    expected: ClassVar[ExpectedRow] = ExpectedRow("attention", am.ATTENTION_OPS)

    def __init__(self, target=None, contrib_op: str = "Attention") -> None:
        super().__init__(target)
        if contrib_op not in CONTRIB_OPS:
            raise ValueError(f"contrib_op must be one of {CONTRIB_OPS}, got {contrib_op!r}")
        # Preferred contrib op; MultiHeadAttention is the fallback when packing is impossible.
        self.contrib_op = contrib_op

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.blocked = 0  # matched but left: the target has no op for it (e.g. opset < 23)
        self.declined = 0  # matched but left: every fused form is measured slower
        self.rejected: list[str] = []  # why matched softmaxes were not fused
        self._opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        # Values built once and shared by every layer: int32 masks, full-query biases.
        self._shared: dict[tuple[str, ir.Value], ir.Value] = {}
        infer_shapes(model)
        graph = model.graph  # attention lives in the main graph of encoders
        for softmax in [n for n in graph if am.is_op(n, "Softmax")]:
            if softmax.graph is None:  # removed by an earlier rewrite
                continue
            try:
                match = self._match(softmax)
                self._rewrite(graph, match)
            except Rejected as exc:
                _detach([n for n in getattr(self, "_pending", []) if n.graph is None])
                self.rejected.append(f"{softmax.name}: {exc}")
                logger.debug("attention at %s not fused: %s", softmax.name, exc)
        if self.matches:
            graph.sort()  # a reused int32 mask may sit after the layers fused this time
        if self.matches and CONTRIB_DOMAIN not in model.opset_imports and self._used_contrib(graph):
            model.opset_imports[CONTRIB_DOMAIN] = 1
        if self.blocked:
            logger.info("%d attention patterns left: the target has no op for them", self.blocked)
        return self.result(model)

    @staticmethod
    def _used_contrib(graph: ir.Graph) -> bool:
        return any(node.domain == CONTRIB_DOMAIN for node in graph)

    # -- match -------------------------------------------------------------------------

    def _match(self, softmax: ir.Node) -> dict:
        rank = _rank(softmax.inputs[0])
        # Softmax's default axis was 1 before opset 13 (and it flattened from that axis on, so
        # an explicit last axis means the same in every opset).
        axis = softmax.attributes.get_int("axis", -1 if self._opset >= 13 else 1)
        if axis not in (-1, 3) or rank not in (None, 4):
            raise Rejected(f"softmax axis {axis} is not the last of a rank-4 tensor")
        probs = softmax.outputs[0]
        uses = list(probs.uses())
        if len(uses) != 1 or not am.is_op(uses[0].node, "MatMul") or uses[0].idx != 0:
            raise Rejected("softmax output does not feed one MatMul as its left operand")
        pv = uses[0].node
        scores, bias, add = softmax.inputs[0], None, None
        node = am.producer(scores, "Add")
        if node is not None:
            for a, b in (node.inputs, node.inputs[::-1]):
                chain = am.walk_back(a)
                if chain is not None and am.is_op(chain.source.producer(), "MatMul"):
                    if all(n.op_type in ("Mul", "Div") for n in chain.nodes):
                        scores, bias, add = a, b, node
                        break
            if add is None:
                raise Rejected("Add before softmax has no scaled Q@K^T operand")
        post = am.walk_back(scores)
        if post is None or any(n.op_type not in ("Mul", "Div") for n in post.nodes):
            raise Rejected("softmax input is not a scaled MatMul")
        qk = am.producer(post.source, "MatMul")
        if qk is None:
            raise Rejected("no Q@K^T MatMul before softmax")
        q_chain, k_chain, v_chain = (am.walk_back(v) for v in (*qk.inputs, pv.inputs[1]))
        if q_chain is None or k_chain is None or v_chain is None:
            raise Rejected("Q, K or V operand missing")
        if v_chain.scale != 1.0:
            raise Rejected("V is scaled")
        projections = [am.match_projection(c.source) for c in (q_chain, k_chain, v_chain)]
        if any(p is None for p in projections):
            raise Rejected("Q, K or V is not a MatMul(+Add) projection")
        x = projections[0].x
        if any(p.x is not x for p in projections):
            raise Rejected("Q, K and V are not projected from the same hidden states")
        width = am.dim_size(q_chain.source, -1)
        head = am.dim_size(qk.inputs[0], -1)
        if not isinstance(width, int) or not isinstance(head, int) or head < 1:
            raise Rejected("projection width or head size unknown")
        if width % head or _rank(x) != 3:
            raise Rejected(f"width {width} is not a multiple of head size {head}, or X not 3-D")
        if any(am.dim_size(c.source, -1) != width for c in (k_chain, v_chain)):
            raise Rejected("Q, K and V widths differ")
        heads = width // head
        sizes = {"b": am.dim_size(x, 0), "s": am.dim_size(x, 1), "h": heads, "d": head}
        sizes["e"] = am.dim_size(x, 2)
        tracker = am.LayoutTracker(sizes)
        tracker.layouts[x] = am.HIDDEN_LAYOUT
        for chain in (q_chain, k_chain, v_chain):
            tracker.layouts[chain.source] = am.OUT_LAYOUT
        wanted = (am.Q_LAYOUT, am.K_T_LAYOUT, am.V_LAYOUT)
        for chain, layout, label in zip((q_chain, k_chain, v_chain), wanted, "QKV", strict=True):
            got = am.chain_layout(tracker, chain)
            if got != layout:
                raise Rejected(f"{label} head layout {got} is not {layout} (H={heads}, D={head})")
        tracker.layouts[pv.outputs[0]] = am.Q_LAYOUT
        merge = am.walk_forward(tracker, pv.outputs[0], am.OUT_LAYOUT)
        if merge is None:
            raise Rejected("attention output is not merged back to [B, S, H*D]")
        alpha = q_chain.scale * k_chain.scale * post.scale
        if not math.isfinite(alpha) or alpha <= 0.0:
            raise Rejected(f"scale {alpha} is not a positive finite number")
        out = merge[-1].outputs[0] if merge else pv.outputs[0]
        core = [*q_chain.nodes, *k_chain.nodes, *v_chain.nodes, qk, *post.nodes]
        core += ([add] if add is not None else []) + [softmax, pv, *merge]
        return {
            "x": x,
            "projections": projections,
            "sources": [q_chain.source, k_chain.source, v_chain.source],
            "heads": heads,
            "head": head,
            "alpha": alpha,
            "bias": bias,
            "core": core,
            "out": out,
            "root": merge[-1] if merge else pv,
        }

    # -- rewrite -----------------------------------------------------------------------

    def _rewrite(self, graph: ir.Graph, m: dict) -> None:
        x, out = m["x"], m["out"]
        if x.dtype not in FLOAT_TYPES:
            raise Rejected(f"hidden states dtype {x.dtype} is not float/float16")
        if out.is_graph_output() and not out.name:
            raise Rejected("output has no name")
        attrs_scale = []
        self._pending: list[ir.Node] = []  # nodes for shared values, added on success
        self._pending_shared: dict[tuple[str, ir.Value], ir.Value] = {}
        if not math.isclose(m["alpha"], 1.0 / math.sqrt(m["head"]), rel_tol=1e-6):
            attrs_scale = [ir.AttrFloat32("scale", m["alpha"])]
        if self.target.allows_contrib:
            mask = None
            if m["bias"] is not None:
                mask = am.match_mask_bias(m["bias"])
                if mask is None:
                    raise Rejected("mask bias is not proven to come from a 2-D attention mask")
            packed = self.contrib_op == "Attention" and self._packable(m)
            if packed:  # the projections must be private too; else MultiHeadAttention
                projections = am.projection_nodes(m["projections"])
                try:
                    self._private(projections + m["core"], out)
                except Rejected as exc:
                    logger.debug("not packing Q/K/V for %s: %s", out.name, exc)
                    packed = False
            builds = [self._packed, self._mha] if packed else [self._mha]
            if not self.target.measures:  # the preferred op, as long as nothing is timed
                builds = builds[:1]
            node, removed, new_inits = self._fastest(m, mask, attrs_scale, builds)
        else:
            if not self.can_emit_standard("Attention", self._opset):
                self.blocked += 1
                raise Rejected(f"portable target needs opset >= 23 (model has {self._opset})")
            candidate = self._standard(m, attrs_scale)
            try:
                node, removed, new_inits = self._vet(candidate, out)
            except Rejected:
                _detach([candidate[0]])
                raise
        new = node.outputs[0]
        new.type, new.shape = out.type, out.shape
        if not can_replace(out, new):
            _detach([node])
            raise Rejected("output cannot be replaced")
        for value in new_inits:
            base, i = value.name, 1
            while value.name in graph.initializers:
                value.name, i = f"{base}_{i}", i + 1
            graph.register_initializer(value)
        for extra in self._pending:
            graph.insert_before(m["root"], extra)
        self._shared.update(self._pending_shared)
        graph.insert_before(m["root"], node)
        name = out.name
        replace_value(out, new)
        feeding = [v for n in removed for v in n.inputs if v is not None]
        graph.remove(removed, safe=True)
        new.name = name
        _remove_dead_producers(graph, feeding)
        self.matches += 1
        logger.debug("fused attention into %s.%s %s", node.domain, node.op_type, name)

    def _vet(self, candidate: tuple, out: ir.Value) -> tuple:
        """``(node, removed, inits)`` with the pattern's dead shape readers added to
        ``removed``; Rejected when an intermediate is used elsewhere or the target has no
        kernel for the node."""
        node, removed, inits = candidate
        removed = removed + self._shape_readers(removed, out)
        self._private(removed, out)
        if not self.can_emit(node):
            self.blocked += 1
            raise Rejected(f"target {self.target.name} cannot run {node.domain}.{node.op_type}")
        return node, removed, inits

    def _fastest(self, m: dict, mask, scale: list, builds: list) -> tuple:
        """The candidate to emit: the first when the target is not timed, else the one
        measured fastest among those not slower than the pattern (``Target.measure_rewrite``),
        the first winning when within ``PREFERENCE`` of the fastest.

        Each candidate is built and vetted before the next is built (a built node uses the
        graph's values, and vetting checks those uses). Every candidate is timed against the
        same nodes (projections + core), so their ratios compare: MultiHeadAttention keeps
        the projections, so they count on its side. The losers are detached so they leave
        no uses on the graph's values.
        """
        out = m["out"]
        projections = am.projection_nodes(m["projections"])
        vetted, reasons = [], []
        for build in builds:
            candidate = build(m, mask, scale)
            try:
                vetted.append(self._vet(candidate, out))
            except Rejected as exc:
                reasons.append(str(exc))
                _detach([candidate[0]])
        if not vetted:
            raise Rejected("; ".join(reasons))
        best, best_ratio, checks = None, math.inf, []
        for node, removed, inits in vetted:
            kept = [] if set(projections) <= set(removed) else projections
            check = self.measure_rewrite(
                kept + [n for n in removed if n not in kept],
                [out],
                kept + [node],
                [node.outputs[0]],
            )
            if check is None:  # not timed: the preferred candidate
                best = (node, removed, inits)
                break
            checks.append(check)
            ratio = check.ratio if check.ratio is not None else 1.0
            # The preferred (first) form wins near-ties, so the choice does not flip with noise.
            if not check.declined and ratio < best_ratio - (PREFERENCE if best else 0.0):
                best, best_ratio = (node, removed, inits), ratio
        _detach([node for node, _, _ in vetted if best is None or node is not best[0]])
        if best is None:
            self.declined += 1
            raise Rejected("measured slower: " + "; ".join(c.describe() for c in checks))
        return best

    def _packable(self, m: dict) -> bool:
        weights = [p.weight_array() for p in m["projections"]]
        biases = [p.bias_array() for p in m["projections"]]
        width = m["heads"] * m["head"]
        if any(w is None or w.ndim != 2 or w.shape[1] != width for w in weights):
            return False
        if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            return False
        # A missing bias (remove_noops drops an all-zero one) is packed as zeros.
        ok_bias = all(
            p.bias is None or b is not None for p, b in zip(m["projections"], biases, strict=True)
        )
        return ok_bias and all(b is None or b.shape == (width,) for b in biases)

    def _mask_input(self, mask: am.MaskBias | None) -> ir.Value | None:
        if mask is None:
            return None
        if mask.mask.dtype == ir.DataType.INT32:
            return mask.mask
        key = ("int32", mask.mask)
        cached = self._shared.get(key) or self._pending_shared.get(key)
        if cached is not None:
            return cached
        for use in mask.mask.uses():  # one made by an earlier call of this pass (a later
            # fixed-point iteration fusing the layers left over): reuse it
            user = use.node
            if (
                user.op_type == "Cast"
                and user.domain in ("", "ai.onnx")
                and user.graph is not None
                and user.attributes.get_int("to", 0) == ir.DataType.INT32
            ):
                return user.outputs[0]
        cast = ir.Node(
            "", "Cast", [mask.mask], [ir.AttrInt64("to", ir.DataType.INT32)], name="mask_int32"
        )
        value = cast.outputs[0]
        value.name = f"{mask.mask.name}_int32"
        value.dtype = ir.DataType.INT32
        value.shape = mask.mask.shape
        self._pending.append(cast)
        self._pending_shared[("int32", mask.mask)] = value
        return value

    def _packed(self, m: dict, mask: am.MaskBias | None, scale: list) -> tuple:
        projections = m["projections"]
        weights = [p.weight_array() for p in projections]
        stem = m["root"].name or m["out"].name or "attention"
        w = ir.Value(name=f"{stem}_qkv_weight", const_value=ir.tensor(np.concatenate(weights, 1)))
        # ORT's CPU Attention kernel requires the bias input: absent ones are zeros.
        zeros = np.zeros(weights[0].shape[1], weights[0].dtype)
        biases = [zeros if p.bias is None else p.bias_array() for p in projections]
        bias = ir.Value(name=f"{stem}_qkv_bias", const_value=ir.tensor(np.concatenate(biases)))
        inits = [w, bias]
        for value in inits:
            value.dtype = value.const_value.dtype
            value.shape = ir.Shape(value.const_value.shape)
        mask_value = self._mask_input(mask)
        attrs = [ir.AttrInt64("num_heads", m["heads"]), *scale]
        if mask is not None:
            attrs.append(ir.AttrFloat32("mask_filter_value", mask.fill))
        inputs = [m["x"], w, bias] + ([mask_value] if mask is not None else [])
        node = ir.Node(CONTRIB_DOMAIN, "Attention", inputs, attrs, name=f"{stem}_Attention")
        removed = am.projection_nodes(projections) + m["core"]
        return node, removed, inits

    def _mha(self, m: dict, mask: am.MaskBias | None, scale: list) -> tuple:
        mask_value = self._mask_input(mask)
        attrs = [ir.AttrInt64("num_heads", m["heads"]), *scale]
        inputs = list(m["sources"])
        if mask is not None:
            attrs.append(ir.AttrFloat32("mask_filter_value", mask.fill))
            inputs += [None, mask_value]
        stem = m["root"].name or "attention"
        node = ir.Node(CONTRIB_DOMAIN, "MultiHeadAttention", inputs, attrs, name=f"{stem}_MHA")
        return node, list(m["core"]), []

    def _standard(self, m: dict, scale: list) -> tuple:
        bias = m["bias"]
        inputs = list(m["sources"])
        if bias is not None:
            if bias.dtype != m["x"].dtype or _rank(bias) != 4:
                raise Rejected("attention bias is not a 4-D tensor of the activations' type")
            inputs.append(self._full_query_axis(bias, m["x"]))
        heads = m["heads"]
        attrs = [ir.AttrInt64("q_num_heads", heads), ir.AttrInt64("kv_num_heads", heads), *scale]
        stem = m["root"].name or "attention"
        node = ir.Node("", "Attention", inputs, attrs, name=f"{stem}_Attention")
        return node, list(m["core"]), []

    def _full_query_axis(self, bias: ir.Value, x: ir.Value) -> ir.Value:
        """``bias`` with its query axis as long as the sequence.

        ORT's Attention kernel does not broadcast ``attn_mask`` over the query axis (the
        standard allows it), and eager exports add a ``[B, 1, 1, S]`` bias. Expanding to
        ``[B, 1, S, S]`` is exact: the bias was added to the ``[B, H, S, S]`` scores, so its
        dims were already 1 or full. Built once per bias and shared by the layers.
        """
        size = am.dim_size(bias, -2)
        if size is not None and size == am.dim_size(x, 1):
            return bias
        cached = self._shared.get(("full", bias))
        if cached is not None:
            return cached
        stem = bias.name or "attn_bias"

        def add(op: str, inputs: list, *attrs: ir.Attr) -> ir.Value:
            node = ir.Node("", op, inputs, attrs, name=f"{stem}_full_{len(self._pending)}")
            self._pending.append(node)
            return node.outputs[0]

        def const(value: int) -> ir.Value:
            return add("Constant", [], ir.AttrTensor("value", ir.tensor(np.array([value]))))

        shape = add("Shape", [x], ir.AttrInt64("end", 2))  # [B, S]
        batch = add("Slice", [shape, const(0), const(1)])
        seq = add("Slice", [shape, const(1), const(2)])
        concat = add("Concat", [batch, const(1), seq, seq], ir.AttrInt64("axis", 0))
        full = add("Expand", [bias, concat])
        full.name, full.dtype = f"{stem}_full_query", bias.dtype
        self._pending_shared[("full", bias)] = full
        return full

    def _shape_readers(self, removed: list[ir.Node], out: ir.Value) -> list[ir.Node]:
        """Shape nodes (and their shape arithmetic) reading pattern intermediates that only
        feed the pattern's own reshapes: dead once the pattern goes, so removed with it."""
        inside = set(removed)
        extra: list[ir.Node] = []
        for node in removed:
            value = node.outputs[0]
            if value is out:
                continue
            for use in list(value.uses()):
                reader = use.node
                if reader in inside or not am.is_op(reader, "Shape"):
                    continue
                closure = _shape_closure(reader, inside)
                if closure is None:
                    raise Rejected(f"{value.name} has a Shape reader used outside the pattern")
                for n in closure:
                    if n not in inside:
                        inside.add(n)
                        extra.append(n)
        return extra

    def _private(self, removed: list[ir.Node], out: ir.Value) -> None:
        """Raise unless every output of ``removed`` (but ``out``) is used only inside it.

        Shape readers are ignored here; ``_shape_readers`` decides about them.
        """
        inside = set(removed)
        for node in removed:
            for value in node.outputs:
                if value is out:
                    continue
                if value.is_graph_output():
                    raise Rejected(f"intermediate {value.name} is a graph output")
                if any(
                    use.node not in inside and not _shape_reader(use.node, removed)
                    for use in value.uses()
                ):
                    raise Rejected(f"intermediate {value.name} is used outside the pattern")


def _detach(nodes: list[ir.Node]) -> None:
    """Drop the inputs of nodes that will not be inserted, so the graph's values do not
    keep uses by them."""
    for node in nodes:
        node.resize_inputs(0)


def _remove_dead_producers(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the nodes and initializers that only fed the removed pattern (the mask bias chain
    once its last layer is fused, shape arithmetic, the unpacked Q/K/V weights)."""
    stack = list(values)
    while stack:
        value = stack.pop()
        if value.is_initializer() and value.graph is graph and _unused(value):
            graph.initializers.pop(value.name, None)  # the Q/K/V weights, now packed
            continue
        node = value.producer()
        if node is None or node.graph is not graph or not is_standard(node):
            continue
        if any(out.uses() or out.is_graph_output() for out in node.outputs):
            continue
        if node.op_type in NON_DETERMINISTIC_OPS:
            continue
        stack.extend(v for v in node.inputs if v is not None)
        graph.remove(node, safe=True)


def _unused(value: ir.Value) -> bool:
    return not value.uses() and not value.is_graph_output() and not value.is_graph_input()


def _shape_reader(node: ir.Node, pattern: list[ir.Node]) -> bool:
    return am.is_op(node, "Shape") and _shape_closure(node, set(pattern)) is not None


def _shape_closure(start: ir.Node, pattern: set[ir.Node]) -> list[ir.Node] | None:
    """``start`` and the shape-arithmetic nodes fed by it, if all end in ``pattern``."""
    seen: list[ir.Node] = []
    stack = [start]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        if not am.is_op(node, *SHAPE_OPS) or node.outputs[0].is_graph_output():
            return None
        seen.append(node)
        for use in node.outputs[0].uses():
            if use.node in pattern:
                if not (am.is_op(use.node, "Reshape") and use.idx == 1):
                    return None
                continue
            stack.append(use.node)
    return seen


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)
