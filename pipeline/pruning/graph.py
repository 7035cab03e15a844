"""What every prunable block shares: the projection its channels feed, and the rewrite.

A block (feed-forward channels, ``ffn``; attention heads, ``heads``) ends in a *down
projection* ``MatMul(h, W_down)`` with a constant weight, maybe followed by an ``Add`` of a
constant bias, whose result is added to the residual stream (an ``Add``, or ORT's fused
``Skip(Simplified)LayerNormalization``). Pruning keeps some rows of ``W_down`` (refitted or
not, ``reconstruct``) and the intercept of a refit goes to the bias. ``Rewrite`` makes the
changes without editing any initializer in place (one may be shared by other nodes): each
replaced input gets a fresh initializer, and initializers nothing reads any more are
dropped at the end.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array, is_standard
from graph_passes.match import FLOAT_TYPES, fresh_name, is_op, new_initializer

MS_DOMAIN = "com.microsoft"
SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")


def matmul_weight(node: ir.Node) -> np.ndarray | None:
    """The constant 2-D float weight of a standard ``MatMul(x, W)``, else None."""
    if not (is_op(node, "MatMul") and is_standard(node)) or len(node.inputs) != 2:
        return None
    value = node.inputs[1]
    if value is None or value.dtype not in FLOAT_TYPES:
        return None
    array = constant_array(value)
    return array if array is not None and array.ndim == 2 else None


def bias_of(down: ir.Node) -> tuple[ir.Node, int] | None:
    """The ``Add`` of a constant ``[H]`` that alone reads the down projection's output, and
    the index of the bias among its inputs."""
    out = down.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    add = uses[0].node
    if not (is_op(add, "Add") and is_standard(add)) or len(add.inputs) != 2:
        return None
    other = 1 - uses[0].idx
    bias = constant_array(add.inputs[other])
    hidden = constant_array(down.inputs[1]).shape[1]
    if bias is None or bias.ndim != 1 or bias.shape[0] != hidden:
        return None
    return add, other


def residual_site(down: ir.Node) -> tuple[ir.Node, int] | None:
    """Where the block output (after its bias) enters the residual stream: the ``Add``, or
    the fused ``Skip(Simplified)LayerNormalization``, that alone reads it, and the index of
    the block output among its inputs (the other of inputs 0 and 1 is the stream, never a
    constant)."""
    bias = bias_of(down)
    out = (bias[0] if bias is not None else down).outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    node, index = uses[0].node, uses[0].idx
    adds = is_op(node, "Add") and is_standard(node) and len(node.inputs) == 2
    skips = node.domain == MS_DOMAIN and node.op_type in SKIP_NORMS and index in (0, 1)
    if not (adds or skips):
        return None
    other = node.inputs[1 - index]
    return None if other is None or constant_array(other) is not None else (node, index)


def residual_of(down: ir.Node) -> ir.Value | None:
    """The residual stream the block output (after its bias) is added to."""
    site = residual_site(down)
    return None if site is None else site[0].inputs[1 - site[1]]


def _skip_norm_bias(down: ir.Node) -> tuple[ir.Node, int] | None:
    """The fused residual norm that alone reads the down projection's output, and the index
    of its ``bias`` input (``input + skip + bias`` is what it normalizes and returns), when
    that input is absent or constant."""
    out = down.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    node = uses[0].node
    if node.domain != MS_DOMAIN or node.op_type not in SKIP_NORMS or uses[0].idx not in (0, 1):
        return None
    index = 3 if node.op_type == "SkipSimplifiedLayerNormalization" else 4
    if index < len(node.inputs) and node.inputs[index] is not None:
        if constant_array(node.inputs[index]) is None:
            return None
    return node, index


def resized(shape: ir.Shape | None, last: int) -> ir.Shape | None:
    """``shape`` with its last dimension set to ``last`` (None and scalars as they are)."""
    if shape is None or len(shape) == 0:
        return shape
    return ir.Shape([*list(shape)[:-1], last])


class Rewrite:
    """The changes to one graph: fresh initializers for replaced inputs, dropped when unused."""

    def __init__(self, graph: ir.Graph, names: set[str]) -> None:
        self.graph, self.names = graph, names
        self.replaced: list[ir.Value] = []

    def swap(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Input ``index`` of ``node`` becomes a new initializer holding ``array`` (in the
        old one's dtype)."""
        old = node.inputs[index]
        dtype = constant_array(old).dtype
        base = f"{old.name or node.name or 'pruned'}_pruned"
        fresh = new_initializer(self.graph, self.names, base, array.astype(dtype))
        node.replace_input_with(index, fresh)
        self.replaced.append(old)

    def down(
        self,
        down: ir.Node,
        bias: tuple[ir.Node, int] | None,
        weight: np.ndarray,
        intercept: np.ndarray | None,
    ) -> None:
        """``weight [k, H]`` replaces ``W_down``; ``intercept [H]`` (None: no change) is added
        to the bias: the ``Add`` of one, else the bias input of the fused residual norm that
        reads the output (no node added), else a new ``Add``."""
        self.swap(down, 1, weight)
        if intercept is None:
            return
        slot = bias or _skip_norm_bias(down)
        if slot is None:
            self._add_bias(down, intercept)
            return
        node, index = slot
        current = node.inputs[index] if index < len(node.inputs) else None
        if current is not None:
            self.swap(node, index, constant_array(current) + intercept)
            return
        dtype = constant_array(down.inputs[1]).dtype
        base = f"{down.name or 'pruned'}_bias"
        fresh = new_initializer(self.graph, self.names, base, intercept.astype(dtype))
        node.resize_inputs(index + 1)
        node.replace_input_with(index, fresh)

    def cut(self, down: ir.Node, constant: np.ndarray) -> None:
        """The block output stops reaching the residual stream: the ``constant [H]`` (its
        calibration mean) takes its place as an input of the ``Add``, or of the fused
        residual norm, that reads it (``residual_site``); the block is left dead for
        ``remove_dead`` to collect.

        A fused norm's skip input cannot be a ``[H]`` constant, so it reads
        ``Expand(constant, Shape(stream))``: the one fused kernel stays, with every output
        it had (the residual sum SkipSimplifiedLayerNormalization hands on included), at
        any opset; a standard norm in its place would need LayerNormalization (opset 17)
        or RMSNormalization (23), and ORT's SimplifiedLayerNormalization fails the ONNX
        checker below 23."""
        node, index = residual_site(down)
        dtype = constant_array(down.inputs[1]).dtype
        base = f"{down.name or 'layer'}_mean"
        fresh = new_initializer(self.graph, self.names, base, constant.astype(dtype))
        if is_op(node, "Add"):
            node.replace_input_with(index, fresh)
            return
        stream = node.inputs[1 - index]
        shape = ir.Node("", "Shape", [stream], name=fresh_name(f"{base}_shape", self.names))
        expand = ir.Node("", "Expand", [fresh, shape.outputs[0]], name=f"{shape.name}_expand")
        shape.outputs[0].name, expand.outputs[0].name = shape.name, expand.name
        expanded = expand.outputs[0]
        expanded.type, expanded.shape = stream.type, stream.shape
        self.graph.insert_before(node, [shape, expand])
        node.replace_input_with(index, expanded)

    def _add_bias(self, down: ir.Node, intercept: np.ndarray) -> None:
        """``Add(down output, intercept)`` takes the down output's place (and name, when it
        is a graph output)."""
        out = down.outputs[0]
        dtype = constant_array(down.inputs[1]).dtype
        base = f"{down.name or 'pruned'}_bias"
        bias = new_initializer(self.graph, self.names, base, intercept.astype(dtype))
        add = ir.Node("", "Add", [out, bias], name=f"{down.name}_bias" if down.name else None)
        summed = add.outputs[0]
        summed.type, summed.shape = out.type, out.shape
        for usage in list(out.uses()):
            if usage.node is not add:
                usage.node.replace_input_with(usage.idx, summed)
        if out.is_graph_output():
            position = list(self.graph.outputs).index(out)
            name, out.name = out.name, fresh_name(f"{out.name}_unbiased", self.names)
            self.graph.outputs[position] = summed
            summed.name = name
        elif out.name:
            summed.name = fresh_name(f"{out.name}_biased", self.names)
        self.graph.insert_after(down, add)

    def finish(self) -> None:
        """Drop the replaced initializers nothing reads any more."""
        initializers = self.graph.initializers
        for value in self.replaced:
            unused = not value.uses() and not value.is_graph_output()
            if unused and value.is_initializer() and initializers.get(value.name) is value:
                del initializers[value.name]
