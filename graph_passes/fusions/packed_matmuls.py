"""Pack MatMuls that read the same activation into one MatMul on concatenated weights.

A transformer layer multiplies one normalized hidden state by several weights: q, k and v;
an MLP's gate and up. Each is its own kernel call, and in one-token decoding (M = 1) each call
is a small memory-bound GEMV whose fixed cost (dispatch, threading, and for int4 the
MatMulNBits block setup and the offsets of ``int4_affine``) is paid again::

    before:  q = MatMul(x, Wq)    k = MatMul(x, Wk)    v = MatMul(x, Wv)
    after:   q, k, v = Split<axis=-1, split=[Nq, Nk, Nv]>(MatMul(x, Concat(Wq, Wk, Wv, axis=1)))

Exact: column j of ``x @ [Wq | Wk | Wv]`` is column j of the MatMul its weight came from (the
same dot products, in the same order). The packed weight is one new initializer; weights no
other node reads are dropped. ORT's optimizer and onnxruntime-genai's builder pack q/k/v the
same way for their attention ops.

It waits until every other pass is done (``after_fixed_point``): an attention fusion that only
matches in a later iteration would otherwise find q/k/v already packed (``fuse_attention``
reads packed q/k/v too; the decoder attention fusions do not).

Checks: each weight is a constant 2-D tensor of one float type with the same K (rows);
``x`` is the same value (not merely an equal one); two or more MatMuls. Runs after the
attention fusions, which match the separate projections.
"""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array, is_standard, replace_value
from graph_passes.fusion import Fusion
from graph_passes.match import FLOAT_TYPES, all_names, is_op, new_initializer, opset_of

SPLIT_INPUT_OPSET = 13  # Split takes ``split`` as an input from opset 13


class FusePackedMatMuls(Fusion):
    """MatMul(x, W1), MatMul(x, W2), ... -> Split(MatMul(x, [W1 | W2 | ...]))."""

    name: ClassVar[str] = "fuse_packed_matmuls"
    position: ClassVar[int] = 125
    after_fixed_point: ClassVar[bool] = True  # the attention fusions match the separate q/k/v
    runs_after: ClassVar[tuple[str, ...]] = (
        "fuse_decoder_attention",
        "fuse_attention_cache",
        "fuse_attention",
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        opset = opset_of(model)
        names = all_names(model)
        for graph in model.graphs():
            groups: dict[int, list[tuple[ir.Node, np.ndarray]]] = defaultdict(list)
            for node in graph:
                weight = _constant_weight(node)
                if weight is not None:
                    groups[id(node.inputs[0])].append((node, weight))
            for members in groups.values():
                by_k: dict[tuple, list[tuple[ir.Node, np.ndarray]]] = defaultdict(list)
                for node, weight in members:
                    by_k[weight.shape[0], weight.dtype.str].append((node, weight))
                for same in by_k.values():
                    if len(same) >= 2:
                        self._pack(graph, same, names, opset)
                        self.matches += 1
        return self.result(model)

    def _pack(self, graph: ir.Graph, members, names: set[str], opset: int) -> None:
        nodes = [node for node, _ in members]
        first = nodes[0]
        packed = np.concatenate([weight for _, weight in members], axis=1)
        weight = new_initializer(graph, names, f"{first.name or 'matmul'}_packed", packed)
        # Unnamed nodes stay unnamed: a made-up name could repeat (ORT rejects duplicates).
        named = f"{first.name}_packed" if first.name else None
        matmul = ir.Node("", "MatMul", [first.inputs[0], weight], name=named)
        widths = np.array([w.shape[1] for _, w in members], dtype=np.int64)
        if opset >= SPLIT_INPUT_OPSET:
            sizes = new_initializer(graph, names, f"{first.name or 'matmul'}_widths", widths)
            split = ir.Node(
                "",
                "Split",
                [matmul.outputs[0], sizes],
                [ir.AttrInt64("axis", -1)],
                num_outputs=len(nodes),
                name=f"{first.name}_unpack" if first.name else None,
            )
        else:
            split = ir.Node(
                "",
                "Split",
                [matmul.outputs[0]],
                [ir.AttrInt64("axis", -1), ir.AttrInt64s("split", widths.tolist())],
                num_outputs=len(nodes),
                name=f"{first.name}_unpack" if first.name else None,
            )
        graph.insert_before(first, [matmul, split])
        old_weights = [node.inputs[1] for node in nodes]
        for node, out in zip(nodes, split.outputs, strict=True):
            old = node.outputs[0]
            out.type, out.shape = old.type, old.shape
            name = old.name
            replace_value(old, out)
            out.name = name
        graph.remove(nodes, safe=True)
        for value in old_weights:
            unused = not value.uses() and not value.is_graph_output()
            if unused and value.is_initializer() and graph.initializers.get(value.name) is value:
                del graph.initializers[value.name]


def _constant_weight(node: ir.Node) -> np.ndarray | None:
    """The 2-D float constant weight of a plain ``MatMul(x, W)``, else None."""
    if not (is_op(node, "MatMul") and is_standard(node)) or len(node.inputs) != 2:
        return None
    x, weight = node.inputs
    if x is None or weight is None or weight.dtype not in FLOAT_TYPES:
        return None
    if node.outputs[0].is_graph_output():
        return None  # a graph output keeps its producer (and its declared shape)
    array = constant_array(weight)
    return array if array is not None and array.ndim == 2 else None
