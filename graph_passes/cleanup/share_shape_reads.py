"""Read each dynamic shape once: ``Shape`` nodes over values of the same symbolic dims share one.

Exporters read a dynamic length again wherever the traced code asked for it. Optimum's Llama
export does so in every layer: ``Shape(k) -> Gather(1) -> Add(past) -> Unsqueeze -> Slice(mask)
-> Where`` cuts the same causal mask to the same key length 30 times. The ``k`` of each layer
has the same symbolic dims (``batch, sequence, 192``), so each of those ``Shape`` nodes gives
the same value at run time. This pass points the later ones at the first; the common
subexpression pass then merges the chains behind them. At decode time (one token, batch 1)
every node costs a kernel launch of the same order as the small kernels themselves, so the
chains are a measurable share of a step.

Equality of dims comes from shape inference run afresh from the graph inputs
(``infer_shapes(refresh=True)``): ONNX's inference names a dim only by carrying a symbol from
where it was proven (an input's ``dim_param``, or a fresh ``unk__`` symbol it then
propagates) and leaves a dim it cannot prove unnamed, so two dims with one name are equal. A
dim without a name leaves that ``Shape`` alone.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import onnx_ir as ir

from graph_passes.base import GraphPass, can_replace, is_standard, replace_value
from graph_passes.shapes import infer_shapes

logger = logging.getLogger(__name__)


def _read_dims(node: ir.Node) -> tuple | None:
    """The dims ``Shape(x, start, end)`` returns, as ints and symbols (None when one is
    unknown, or x is an initializer a caller may override)."""
    source = node.inputs[0]
    if source is None or source.shape is None or source.is_initializer():
        return None
    dims = tuple(d if isinstance(d, int) else d.value for d in source.shape)
    rank = len(dims)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start, end = (max(0, min(rank, i + rank if i < 0 else i)) for i in (start, end))
    picked = dims[start:end]
    return None if any(d is None for d in picked) else tuple(picked)


class ShareShapeReads(GraphPass):
    """Later ``Shape`` nodes whose dims are the same symbols as an earlier one's read that one.

    ::

        before:  a = Shape(k0); ...; b = Shape(k1)     k0, k1: [batch, sequence, 192]
        after:   a = Shape(k0); ...; (b's readers read a)

    Only the main graph: a value of an outer graph may be read inside a subgraph, not the
    other way round, and the nodes of a graph are in dependency order, so the first ``Shape``
    of a kind is computed before anything that reads a later one.
    """

    name: ClassVar[str] = "share_shape_reads"
    # The fusions match each layer's own shape arithmetic (the attention cache fusion reads
    # the head split's Reshape target): merged chains would hide it, as on SmolLM2, where
    # running this in the first iteration left the KV cache Concats outside all 30 Attentions.
    after_fixed_point: ClassVar[bool] = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        shapes = [n for n in model.graph if n.op_type == "Shape" and is_standard(n)]
        if len(shapes) < 2:
            return self.result(model)
        infer_shapes(model, refresh=True)
        first: dict[tuple, ir.Value] = {}
        for node in shapes:
            read = _read_dims(node)
            if read is None:
                continue
            if read not in first:
                first[read] = node.outputs[0]
            elif can_replace(node.outputs[0], first[read]):
                replace_value(node.outputs[0], first[read])
                self.matches += 1
        if self.matches:
            logger.debug("share_shape_reads: %d Shape nodes read an earlier one", self.matches)
        return self.result(model)
