"""Fuse a residual Add and the LayerNorm after it into com.microsoft SkipLayerNormalization.

Every transformer block ends ``LayerNorm(residual + sublayer(residual))``; ONNX Runtime has one
kernel for the sum and the normalization::

    before:  s = Add(a, b)                  [optionally a = Add(m, bias), bias a [C] constant]
             z = LayerNormalization<axis=-1, epsilon=eps>(s, gamma, beta)
             (s may also feed later nodes: the residual of the next block)
    after:   z, _, _, s = SkipLayerNormalization<epsilon=eps>(a, b, gamma, beta[, bias])

``z = (s - mean(s)) / sqrt(var(s) + eps) * gamma + beta`` with ``s = input + skip + bias``;
the 4th output (``input_skip_bias_sum``) is ``s`` itself, so a sum that is used elsewhere is
taken from there instead of refusing the match.

The LayerNorm is the standard op or its decomposed form (``fuse_layer_norm``'s matcher):
torch's legacy exporter below opset 17 has no LayerNormalization, and this is how those
exports still get one fused kernel per block.

Shape rules are ORT's CPU kernel's (probed with ORT 1.31): input rank 2 or 3 and exactly the
shape of the sum (a batch-1 input with a batch-2 skip gives a batch-1 output, silently);
skip the same shape, or ``[1, S, C]`` / ``[S, C]`` for a rank-3 input; gamma, beta and bias
of shape ``[C]``. Shapes are compared symbolically, so unknown dims refuse the match.
Contrib only: on ``portable`` nothing is fused. A lone LayerNorm below opset 17 stays
decomposed: ORT runs ``LayerNormalization`` at any opset, but the ONNX checker rejects it
below 17 and there is no com.microsoft LayerNormalization (probed).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import GraphPass, constant_tensor, take_over
from graph_passes.fusions.gelu import is_op, only_use, opset_of, probe_node, producer
from graph_passes.fusions.layer_norm import FuseLayerNorm
from graph_passes.shapes import Dims, infer_shapes, symbolic_dims
from graph_passes.target.targets import CONTRIB_DOMAIN, Target

logger = logging.getLogger(__name__)

SKIP_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def ir_dims(value: ir.Value) -> Dims | None:
    """The value's shape from ONNX shape inference: ints, symbol names, None when unknown."""
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in value.shape)


def same_dim(a: int | str | None, b: int | str | None) -> bool:
    """Dims provably equal: equal ints, or the same named symbol."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and a == b


def same_shape(a: Dims | None, b: Dims | None) -> bool:
    """Shapes provably equal (known rank, every dim equal)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(same_dim(x, y) for x, y in zip(a, b, strict=True))


def skip_fits(skip: Dims | None, s: Dims | None) -> bool:
    """ORT accepts ``skip`` for a sum of ``s``'s shape: the same, or [1, S, C] / [S, C]."""
    if same_shape(skip, s):
        return True
    if skip is None or s is None or len(s) != 3:
        return False
    if len(skip) not in (2, 3) or (len(skip) == 3 and skip[0] != 1):
        return False
    return all(same_dim(x, y) for x, y in zip(skip[-2:], s[-2:], strict=True))


class FuseSkipLayerNorm(GraphPass):
    """Add (+ bias Add) + LayerNorm (standard or decomposed) -> SkipLayerNormalization."""

    name: ClassVar[str] = "fuse_skip_layer_norm"

    def __init__(self, target: Target | None = None) -> None:
        super().__init__(target)
        self._symbolic: dict[str, Dims] | None = None  # ORT's symbolic shapes, when needed
        self.blocked = 0  # matched, but the target has no kernel for the fused node
        self.declined = 0  # matched, but the fused kernel is measured slower on the target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.blocked = self.declined = 0
        if not self.target.allows_contrib:
            return self.result(model)
        opset = opset_of(model)
        infer_shapes(model, refresh=True)
        self._symbolic = None  # computed again for each call: the model has changed
        self._model = model
        matcher = FuseLayerNorm()
        claimed: set[ir.Node] = set()
        for graph in model.graphs():
            fused_here = 0
            for root in reversed(list(graph)):
                if root.graph is not graph or root in claimed:
                    continue
                layer_norm = self._layer_norm(root, matcher, opset)
                if layer_norm is None:
                    continue
                claimed.update(layer_norm[-1])
                fused_here += self.fuse_residual(model, graph, root, *layer_norm)
            if fused_here:
                graph.sort()  # the sum output may feed nodes placed before the LayerNorm
            self.matches += fused_here
        return self.result(model)

    def _layer_norm(self, root: ir.Node, matcher: FuseLayerNorm, opset: int) -> tuple | None:
        """``(s, gamma, beta, eps, nodes)`` of a LayerNorm over the last axis ending at root."""
        if not is_op(root, "LayerNormalization"):
            return matcher.match(root, opset)
        s = root.inputs[0]
        rank = None if s is None or s.shape is None else len(s.shape)
        if rank is None and s is not None:  # e.g. behind a contrib op ONNX cannot infer
            known = self._symbolic_table(root.graph).get(s.name or "")
            rank = None if known is None else len(known)
        axis = root.attributes.get_int("axis", -1)
        extra = [o for o in root.outputs[1:] if o.uses() or o.is_graph_output()]
        if rank is None or axis not in (-1, rank - 1) or extra:
            return None
        if root.attributes.get_int("stash_type", 1) != 1:
            return None
        gamma = root.inputs[1]
        beta = root.inputs[2] if len(root.inputs) > 2 else None
        eps = root.attributes.get_float("epsilon", 1e-5)
        return s, gamma, beta, eps, [root]

    def fuse_residual(
        self, model, graph, root, s, gamma, beta, eps, nodes, *, simplified: bool = False
    ) -> int:
        """Rewrite one match; 1 when fused, 0 when refused (the reason is logged).

        ``simplified``: the norm is an RMSNorm (no mean, no beta) and the op emitted is
        SkipSimplifiedLayerNormalization(input, skip, gamma[, bias]) (fuse_rms_norm)."""
        add = producer(s, "Add")
        picked = None if add is None else self.residual_operands(add, s, gamma, beta, model)
        if picked is None:
            logger.debug("LayerNorm %s: no residual Add with shapes ORT accepts", root.name)
            return 0
        inp, skip, bias, extra_nodes = picked
        inside = {*nodes, add}
        need_sum = s.is_graph_output() or any(u.node not in inside for u in s.uses())
        op = "SkipSimplifiedLayerNormalization" if simplified else "SkipLayerNormalization"
        inputs = [inp, skip, gamma, bias] if simplified else [inp, skip, gamma, beta, bias]
        while inputs[-1] is None:
            inputs.pop()
        attrs = [ir.AttrFloat32("epsilon", float(eps))]
        probe = probe_node(CONTRIB_DOMAIN, op, inputs, attrs, num_outputs=4 if need_sum else 1)
        if not self.target.supports(probe):
            self.blocked += 1
            return 0
        replaced = [*nodes, add, *extra_nodes]
        if not self.target.rewrite_pays(
            replaced,
            [root.outputs[0], s] if need_sum else [root.outputs[0]],
            [probe],
            [probe.outputs[0], probe.outputs[3]] if need_sum else [probe.outputs[0]],
            self._proven_shapes(replaced, inputs, probe) if self.target.measures else None,
        ):
            self.declined += 1
            return 0
        node = ir.Node(
            CONTRIB_DOMAIN,
            op,
            inputs,
            attrs,
            num_outputs=4 if need_sum else 1,
            name=root.name,
        )
        z_name = root.outputs[0].name
        graph.insert_before(root, node)
        take_over(root.outputs[0], node.outputs[0])
        if need_sum:
            take_over(s, node.outputs[3])
        graph.remove(replaced, safe=True)
        model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        logger.debug("fused %s %s (sum reused: %s)", op, z_name, need_sum)
        return 1

    def _proven_shapes(self, replaced: list[ir.Node], inputs: list, probe: ir.Node) -> dict:
        """The dims this pass proved for the rewrite's inputs, by ``id()`` of each value and
        of its probe copy, so kernel timing cuts them out at the right sizes."""
        table = self._symbolic_table(self._model.graph)
        shapes = {}
        for value in {v for n in replaced for v in n.inputs if v is not None}:
            dims = ir_dims(value) or table.get(value.name or "")
            if dims is not None:
                shapes[id(value)] = dims
        for value, copy in zip(inputs, probe.inputs, strict=True):
            if value is not None and id(value) in shapes:
                shapes[id(copy)] = shapes[id(value)]
        return shapes

    def residual_operands(self, add: ir.Node, s: ir.Value, gamma, beta, model: ir.Model):
        """``(input, skip, bias, extra_nodes)`` for the Add, or None when ORT would refuse.

        Shapes are proven with ONNX's inference first, then with ORT's symbolic inference
        (computed once per call, only when needed). Shared with fuse_rms_norm
        (SkipSimplifiedLayerNormalization has the same rules)."""
        shape = ir_dims(s) or self._symbolic_table(model.graph).get(s.name or "")
        if s.dtype not in SKIP_TYPES or shape is None or len(shape) not in (2, 3):
            return None
        hidden = shape[-1]
        if not isinstance(hidden, int):
            return None
        for param in (gamma, beta):
            if param is None:
                continue
            if param.dtype != s.dtype or param.shape is None or list(param.shape) != [hidden]:
                return None
        picked = self._pick(add, s, hidden, ir_dims)
        if picked is None:
            table = self._symbolic_table(model.graph)
            picked = self._pick(add, s, hidden, lambda v: table.get(v.name or ""))
        return picked

    def _symbolic_table(self, graph: ir.Graph) -> dict[str, Dims]:
        """ORT's symbolic shapes of the model, computed once per call and only when needed."""
        if self._symbolic is None:
            model = self._model
            self._symbolic = symbolic_dims(model) if graph is model.graph else {}
        return self._symbolic

    def _pick(self, add: ir.Node, s: ir.Value, hidden: int, dims):
        out = dims(s)
        for inp, skip in (add.inputs, add.inputs[::-1]):
            if inp is None or skip is None:
                continue
            if not same_shape(dims(inp), out) or not skip_fits(dims(skip), out):
                continue
            bias_add = producer(inp, "Add")
            if bias_add is not None and only_use(inp) is add:
                for m, bias in (bias_add.inputs, bias_add.inputs[::-1]):
                    if (
                        m is not None
                        and same_shape(dims(m), out)
                        and self._is_bias(bias, s, hidden)
                    ):
                        return m, skip, bias, [bias_add]
            return inp, skip, None, []
        return None

    def _is_bias(self, value: ir.Value | None, s: ir.Value, hidden: int) -> bool:
        tensor = constant_tensor(value)
        return (
            tensor is not None
            and tensor.dtype == s.dtype
            and tuple(tensor.shape) == (hidden,)
            and bool(np.isfinite(tensor.numpy()).all())
        )
