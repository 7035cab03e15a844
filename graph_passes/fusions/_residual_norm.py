"""A norm fed by a residual Add, fused into ORT's SkipLayerNormalization or (for RMSNorm)
SkipSimplifiedLayerNormalization: both take ``input + skip (+ bias)`` and normalize it, with
the same shape rules. Shared by fuse_skip_layer_norm and fuse_rms_norm; the rules are
documented in ``skip_layer_norm.py``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_tensor, take_over
from graph_passes.fusion import Fusion
from graph_passes.match import ir_dims, only_use, probe_node, producer, same_dim, same_shape
from graph_passes.shapes import Dims, clamped_to, symbolic_dims
from graph_passes.target.targets import CONTRIB_DOMAIN

logger = logging.getLogger(__name__)

SKIP_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def skip_fits(skip: Dims | None, s: Dims | None, *, clamped: bool = False) -> bool:
    """ORT accepts ``skip`` for a sum of ``s``'s shape: the same, or [1, S, C] / [S, C].
    ``clamped``: ``skip`` is an operand of the Add computing ``s``, so a ``Min(k, S)`` dim of
    it counts as ``S`` (``clamped_to``)."""
    if same_shape(skip, s):
        return True
    if skip is None or s is None or len(s) != 3:
        return False
    if len(skip) not in (2, 3) or (len(skip) == 3 and skip[0] != 1):
        return False
    return all(
        same_dim(x, y) or (clamped and clamped_to(x, y))
        for x, y in zip(skip[-2:], s[-2:], strict=True)
    )


def _broadcast_sum(inp: Dims | None, skip: Dims | None) -> Dims | None:
    """``inp``'s shape when it is provably the shape of ``inp + skip`` (every dim of ``skip``
    equal, 1, or clamped to ``inp``'s), else None."""
    if inp is None or skip is None or len(skip) > len(inp):
        return None
    if any(not isinstance(d, int) and (d is None or d.startswith("unk__")) for d in inp):
        return None
    for x, y in zip(skip[::-1], inp[::-1], strict=False):
        if not (x == 1 or same_dim(x, y) or clamped_to(x, y)):
            return None
    return tuple(inp)


class ResidualNormFuser:
    """Fuses residual norms of one model for ``fusion`` (whose target and timing decide).

    One per pass call: it caches ORT's symbolic shapes of the model, computed only when
    ONNX's inference cannot prove a shape. ``blocked`` counts matches the target has no
    kernel for, ``declined`` those whose fused kernel was measured slower.
    """

    def __init__(self, fusion: Fusion, model: ir.Model) -> None:
        self.fusion = fusion
        self._model = model
        self._symbolic: dict[str, Dims] | None = None
        self.blocked = 0
        self.declined = 0

    def fuse(self, graph, root, s, gamma, beta, eps, nodes, *, simplified: bool = False) -> int:
        """Rewrite one match; 1 when fused, 0 when refused (the reason is logged).

        ``simplified``: the norm is an RMSNorm (no mean, no beta) and the op emitted is
        SkipSimplifiedLayerNormalization(input, skip, gamma[, bias]) (fuse_rms_norm)."""
        add = producer(s, "Add")
        picked = None if add is None else self.residual_operands(add, s, gamma, beta)
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
        if not self.fusion.can_emit(probe):
            self.blocked += 1
            return 0
        replaced = [*nodes, add, *extra_nodes]
        if not self.fusion.rewrite_pays(
            replaced,
            [root.outputs[0], s] if need_sum else [root.outputs[0]],
            [probe],
            [probe.outputs[0], probe.outputs[3]] if need_sum else [probe.outputs[0]],
            self._proven_shapes(replaced, inputs, probe) if self.fusion.target.measures else None,
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
        self._model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        logger.debug("fused %s %s (sum reused: %s)", op, z_name, need_sum)
        return 1

    def _proven_shapes(self, replaced: list[ir.Node], inputs: list, probe: ir.Node) -> dict:
        """The dims this pass proved for the rewrite's inputs, by ``id()`` of each value and
        of its probe copy, so kernel timing cuts them out at the right sizes."""
        table = self.symbolic_table(self._model.graph)
        shapes = {}
        for value in {v for n in replaced for v in n.inputs if v is not None}:
            dims = ir_dims(value) or table.get(value.name or "")
            if dims is not None:
                shapes[id(value)] = dims
        for value, copy in zip(inputs, probe.inputs, strict=True):
            if value is not None and id(value) in shapes:
                shapes[id(copy)] = shapes[id(value)]
        return shapes

    def residual_operands(self, add: ir.Node, s: ir.Value, gamma, beta):
        """``(input, skip, bias, extra_nodes)`` for the Add, or None when ORT would refuse.

        Shapes are proven with ONNX's inference first, then with ORT's symbolic inference
        (computed once per call, only when needed)."""
        shape = ir_dims(s) or self.symbolic_table(self._model.graph).get(s.name or "")
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
            table = self.symbolic_table(self._model.graph)
            picked = self._pick(add, s, hidden, lambda v: table.get(v.name or ""))
        return picked

    def symbolic_table(self, graph: ir.Graph) -> dict[str, Dims]:
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
                # the sum's own dims may be unproven (``unk__``) where ORT's inference met a
                # clamped dim (BERT's position embedding at opset < 17): derive them
                out = _broadcast_sum(dims(inp), dims(skip))
                if out is None or not skip_fits(dims(skip), out, clamped=True):
                    out = dims(s)
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
