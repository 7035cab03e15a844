"""Whole layers: residual sublayers found by structure, grouped into layers, cut out.

A transformer layer is its residual sublayers (attention, feed-forward), each of which ends
in a *down projection* (``graph``: a ``MatMul`` with a constant weight, maybe a bias ``Add``)
whose output alone is added to the residual stream, by an ``Add`` or by ORT's fused
``Skip(Simplified)LayerNormalization``::

    post-LN encoder:  r' = SkipLayerNorm(r, Attention(r) W_o + b_o)        (or LayerNorm(Add))
    pre-norm decoder: r' = r + o_proj(Attention(RMSNorm(r)))  (SkipSimplifiedLayerNorm's sum)

Names are never read. The sublayers are taken in graph order and a layer ends with its
feed-forward sublayer (``ffn.block_at``), so an attention sublayer and the feed-forward one
after it make one layer; sublayers after the last feed-forward one make a layer of their
own.

Removing a layer cuts each of its sublayers' contributions to the residual stream
(``Rewrite.cut``): the calibration mean of the contribution takes its place, so what
follows still sees the stream at the offset it was trained on (a post-LN encoder's norms
are not shifted), and whatever computed the contribution and nothing else is dead and goes
(``remove_dead``). What feeds a graph output stays: a decoder's ``present.N.*`` keep being
computed by the layer's K/V projections, so the model's interface is exactly the input's.

Which layers go is measured, not guessed (``influence`` in ``stage``): each layer alone is
cut and the pruned model scored with the user's metric on the decision data; the ``N``
with the smallest drop go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graph_passes.cleanup.remove_dead import RemoveDead
from graph_passes.match import all_names
from pipeline.pruning import ffn
from pipeline.pruning.graph import Rewrite, matmul_weight, residual_site


@dataclass
class Sublayer:
    """A residual sublayer: its down projection, whose output (after its bias) is the
    contribution to the residual stream."""

    down: ir.Node
    feed_forward: bool

    @property
    def contribution(self) -> ir.Value:
        """The value the residual ``Add`` / fused norm reads."""
        node, index = residual_site(self.down)
        return node.inputs[index]

    @property
    def name(self) -> str:
        return self.down.name or self.down.outputs[0].name or "sublayer"


@dataclass
class Layer:
    """One layer: its sublayers in graph order, the feed-forward one last."""

    index: int
    sublayers: list[Sublayer]

    @property
    def name(self) -> str:
        return f"layer {self.index}"


def sublayer_at(node: ir.Node) -> Sublayer | None:
    """The residual sublayer whose down projection is ``node``, or None."""
    if matmul_weight(node) is None or residual_site(node) is None:
        return None
    return Sublayer(node, ffn.block_at(node) is not None)


def find_layers(model: ir.Model) -> list[Layer]:
    """Every layer of the main graph, in graph order (see the module docstring)."""
    layers: list[Layer] = []
    current: list[Sublayer] = []
    for node in model.graph:
        sublayer = sublayer_at(node)
        if sublayer is None:
            continue
        current.append(sublayer)
        if sublayer.feed_forward:
            layers.append(Layer(len(layers), current))
            current = []
    if current:
        layers.append(Layer(len(layers), current))
    return layers


def remove(model: ir.Model, chosen: Sequence[int], means: Sequence[np.ndarray]) -> ir.Model:
    """A copy of ``model`` without the layers ``chosen`` (indices into ``find_layers``):
    each sublayer's contribution replaced by its mean (``means``: one ``[H]`` per sublayer
    of ``find_layers``, in order), then every node and initializer nothing needs any more
    removed."""
    pruned = model.clone()
    rewrite = Rewrite(pruned.graph, all_names(pruned))
    layers = find_layers(pruned)
    sublayers = [sublayer for layer in layers for sublayer in layer.sublayers]
    cut = {id(sublayer) for index in chosen for sublayer in layers[index].sublayers}
    for sublayer, mean in zip(sublayers, means, strict=True):
        if id(sublayer) in cut:
            rewrite.cut(sublayer.down, mean)
    rewrite.finish()
    RemoveDead()(pruned)
    return pruned
