"""Feed-forward blocks, found by graph structure, and their intermediate channels removed.

A feed-forward block is found from its down projection, ``MatMul(h, W_down)`` with a constant
``W_down [I, H]``, walking back from ``h`` through the *channel region*: values whose last
axis holds the ``I`` intermediate channels, made by element-wise nodes only, and ending at
the up projections whose weight columns produce those channels::

    x -> MatMul(W_up [H, I]) -> Add(b [I]) -> GELU -> MatMul(W_down [I, H]) -> Add(b [H])
    x -> MatMul(W_gate) -> SiLU --\
    x -> MatMul(W_up) -----------> Mul -> MatMul(W_down)                      (SwiGLU)
    x -> MatMul([W_gate | W_up]) -> Split -> QuickGelu / Mul -> MatMul(W_down) (packed)

Names are never read: the same walk finds the exported graph (GELU as Div/Erf/Add/Mul/Mul)
and the fused one (``BiasGelu``, ``FastGelu``, ``QuickGelu``, ``Gelu``). Element-wise means
each input is either another region value or a constant that broadcasts per channel (a
scalar, or ``[..., I]`` with ones before). Because channel ``j`` of every region value
depends on channel ``j`` of the projections only, removing channel ``j`` everywhere (a
column of each up/gate weight, the entry of each per-channel constant, a row of
``W_down``) leaves the other channels' values exactly as they were. A region value used
outside the region (a graph output, a ``Shape``) would see its width change, so such a block
is not a block. A region must hold an activation or a gated product: a plain
``MatMul -> MatMul`` pair is not a feed-forward block.

``prune`` rewrites one block in place: new initializers (an initializer may be shared with
other nodes, so none is edited), the Split widths of a packed projection, the declared
shapes of the region values, and the refitted down weight and bias (``reconstruct``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array, is_standard
from graph_passes.match import FLOAT_TYPES, fresh_name, is_op, new_initializer

MS_DOMAIN = "com.microsoft"
# Element-wise ops a channel region may hold: (domain, op type). Activations are the ones
# a region needs at least one of (or a product of two region values, a gate).
LINEAR = {("", "Add"), ("", "Sub"), ("", "Mul"), ("", "Div"), ("", "Neg"), ("", "Identity")}
LINEAR |= {("", "Cast")}
ACTIVATIONS = {
    ("", op)
    for op in (
        "Erf",
        "Sigmoid",
        "Tanh",
        "Relu",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Gelu",
        "Softplus",
        "HardSigmoid",
        "HardSwish",
        "Mish",
        "Abs",
        "Exp",
        "Sqrt",
        "Pow",
        "Clip",
    )
} | {(MS_DOMAIN, op) for op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")}


@dataclass
class Projection:
    """A MatMul whose weight columns make the intermediate channels; ``parts`` of width
    ``I`` side by side when a ``split`` unpacks it (gate and up packed into one weight)."""

    node: ir.Node
    split: ir.Node | None = None
    parts: int = 1


@dataclass
class FfnBlock:
    """One feed-forward block: its projections, the per-channel constants of its region
    (node, input index), the region's values, the down projection, its bias Add, and the
    residual stream its output is added to (None when not found)."""

    width: int
    projections: list[Projection]
    channel_constants: list[tuple[ir.Node, int]]
    values: list[ir.Value]
    down: ir.Node
    bias: tuple[ir.Node, int] | None
    residual: ir.Value | None = None
    activation: str = ""

    @property
    def name(self) -> str:
        return self.down.name or self.down.outputs[0].name or "ffn"

    @property
    def hidden(self) -> ir.Value:
        """``h``, the down projection's input: the channels importance is measured on."""
        return self.down.inputs[0]

    def down_weight(self) -> np.ndarray:
        return constant_array(self.down.inputs[1])


def _weight(node: ir.Node) -> np.ndarray | None:
    """The constant 2-D float weight of a standard ``MatMul(x, W)``, else None."""
    if not (is_op(node, "MatMul") and is_standard(node)) or len(node.inputs) != 2:
        return None
    value = node.inputs[1]
    if value is None or value.dtype not in FLOAT_TYPES:
        return None
    array = constant_array(value)
    return array if array is not None and array.ndim == 2 else None


def _per_channel(array: np.ndarray, width: int) -> bool:
    """A constant that broadcasts per channel over ``[..., width]``."""
    return array.ndim == 0 or (
        all(d == 1 for d in array.shape[:-1]) and array.shape[-1] in (1, width)
    )


def _split_axis_is_last(split: ir.Node) -> bool:
    axis = split.attributes.get_int("axis", 0)
    rank = None if split.inputs[0].shape is None else len(split.inputs[0].shape)
    return axis == -1 or (rank is not None and axis == rank - 1)


def _packed(split: ir.Node, width: int) -> Projection | None:
    """The packed projection a last-axis Split of ``MatMul(x, [W1 | W2 | ...])`` unpacks,
    when every part is ``width`` wide."""
    if not (is_op(split, "Split") and is_standard(split)) or not _split_axis_is_last(split):
        return None
    matmul = split.inputs[0].producer()
    weight = None if matmul is None else _weight(matmul)
    parts = len(split.outputs)
    if weight is None or weight.shape[1] != parts * width:
        return None
    if len(split.inputs[0].uses()) != 1 or split.inputs[0].is_graph_output():
        return None
    widths = constant_array(split.inputs[1]) if len(split.inputs) > 1 else None
    if widths is None:
        widths = split.attributes.get_ints("split", [width] * parts)
    if [int(w) for w in np.asarray(widths).reshape(-1)] != [width] * parts:
        return None
    return Projection(matmul, split, parts)


def block_at(down: ir.Node) -> FfnBlock | None:
    """The feed-forward block whose down projection is ``down``, or None."""
    weight = _weight(down)
    hidden = down.inputs[0] if weight is not None else None
    if hidden is None or hidden.is_graph_output() or len(hidden.uses()) != 1:
        return None
    width = weight.shape[0]
    nodes: list[ir.Node] = []
    values: list[ir.Value] = []
    projections: dict[int, Projection] = {}
    constants: list[tuple[ir.Node, int]] = []
    gated = False
    stack, seen = [hidden], set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        values.append(value)
        node = value.producer()
        if node is None or value.is_graph_output():
            return None
        projection_weight = _weight(node)
        if projection_weight is not None:
            if projection_weight.shape[1] != width:
                return None
            projections[id(node)] = Projection(node)
            continue
        if is_op(node, "Split"):
            packed = _packed(node, width)
            if packed is None:
                return None
            projections[id(packed.node)] = packed
            stack.extend(node.outputs)
            continue
        key = ("" if is_standard(node) else node.domain, node.op_type)
        if key not in LINEAR | ACTIVATIONS or len(node.outputs) != 1:
            return None
        nodes.append(node)
        region_inputs = 0
        for index, operand in enumerate(node.inputs):
            if operand is None:
                continue
            array = constant_array(operand)
            if array is None:
                stack.append(operand)
                region_inputs += 1
            elif not _per_channel(array, width):
                return None
            elif array.ndim and array.shape[-1] == width and width > 1:
                constants.append((node, index))
        gated |= key == ("", "Mul") and region_inputs == 2
    if not projections or not (gated or any(_key(n) in ACTIVATIONS for n in nodes)):
        return None
    inside = {id(n) for n in nodes} | {id(down)}
    inside |= {id(p.split) for p in projections.values() if p.split is not None}
    for value in values:
        if any(id(use.node) not in inside for use in value.uses()):
            return None
    return FfnBlock(
        width=width,
        projections=list(projections.values()),
        channel_constants=constants,
        values=values,
        down=down,
        bias=_bias_of(down),
        residual=_residual_of(down),
        activation="+".join(sorted({n.op_type for n in nodes if _key(n) in ACTIVATIONS})),
    )


def _key(node: ir.Node) -> tuple[str, str]:
    return ("" if is_standard(node) else node.domain, node.op_type)


def _bias_of(down: ir.Node) -> tuple[ir.Node, int] | None:
    """The ``Add`` of a constant ``[H]`` that alone reads the down projection's output."""
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


SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")


def _residual_of(down: ir.Node) -> ir.Value | None:
    """The residual stream the block output (after its bias) is added to: the other input
    of the ``Add``, or of the fused ``Skip(Simplified)LayerNormalization``, that reads it."""
    bias = _bias_of(down)
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
    return None if other is None or constant_array(other) is not None else other


def find_blocks(model: ir.Model) -> list[FfnBlock]:
    """Every feed-forward block of the main graph, in graph order."""
    return [block for node in model.graph if (block := block_at(node)) is not None]


def _resized(shape: ir.Shape | None, last: int) -> ir.Shape | None:
    if shape is None or len(shape) == 0:
        return shape
    return ir.Shape([*list(shape)[:-1], last])


def prune(
    graph: ir.Graph,
    block: FfnBlock,
    keep: np.ndarray,
    down_weight: np.ndarray,
    intercept: np.ndarray | None,
    names: set[str],
) -> None:
    """Keep the channels ``keep`` (sorted indices) of ``block``; ``down_weight [len(keep), H]``
    replaces ``W_down`` and ``intercept [H]`` (None: no change) is added to its bias (an
    ``Add`` is inserted where the block has none)."""
    replaced: list[ir.Value] = []

    def swap(node: ir.Node, index: int, array: np.ndarray) -> None:
        old = node.inputs[index]
        dtype = constant_array(old).dtype
        base = f"{old.name or node.name or 'ffn'}_pruned"
        node.replace_input_with(index, new_initializer(graph, names, base, array.astype(dtype)))
        replaced.append(old)

    kept = len(keep)
    for projection in block.projections:
        weight = constant_array(projection.node.inputs[1])
        columns = np.concatenate([part * block.width + keep for part in range(projection.parts)])
        swap(projection.node, 1, weight[:, columns])
        out = projection.node.outputs[0]
        out.shape = _resized(out.shape, kept * projection.parts)
        split = projection.split
        if split is None:
            continue
        widths = np.full(projection.parts, kept, dtype=np.int64)
        if len(split.inputs) > 1 and split.inputs[1] is not None:
            swap(split, 1, widths)
        elif "split" in split.attributes:
            split.attributes["split"] = ir.AttrInt64s("split", widths.tolist())
    for node, index in block.channel_constants:
        swap(node, index, constant_array(node.inputs[index])[..., keep])
    for value in block.values:
        value.shape = _resized(value.shape, kept)
    swap(block.down, 1, down_weight)
    if intercept is not None:
        if block.bias is not None:
            add, index = block.bias
            swap(add, index, constant_array(add.inputs[index]) + intercept)
        else:
            _add_bias(graph, block.down, intercept, names)
    for value in replaced:
        unused = not value.uses() and not value.is_graph_output()
        if unused and value.is_initializer() and graph.initializers.get(value.name) is value:
            del graph.initializers[value.name]


def _add_bias(graph: ir.Graph, down: ir.Node, intercept: np.ndarray, names: set[str]) -> None:
    """``Add(down output, intercept)`` takes the down output's place (and name, when it is
    a graph output): the refit's intercept where the block had no bias."""
    out = down.outputs[0]
    dtype = constant_array(down.inputs[1]).dtype
    bias = new_initializer(graph, names, f"{down.name or 'ffn'}_bias", intercept.astype(dtype))
    add = ir.Node("", "Add", [out, bias], name=f"{down.name}_bias" if down.name else None)
    summed = add.outputs[0]
    summed.type, summed.shape = out.type, out.shape
    for usage in list(out.uses()):
        if usage.node is not add:
            usage.node.replace_input_with(usage.idx, summed)
    if out.is_graph_output():
        position = list(graph.outputs).index(out)
        name, out.name = out.name, fresh_name(f"{out.name}_unbiased", names)
        graph.outputs[position] = summed
        summed.name = name
    elif out.name:
        summed.name = fresh_name(f"{out.name}_biased", names)
    graph.insert_after(down, add)
