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
from graph_passes.match import is_op
from pipeline.pruning.graph import (
    MS_DOMAIN,
    Rewrite,
    bias_of,
    matmul_weight,
    residual_of,
    resized,
)

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

    @property
    def units(self) -> int:
        """What is kept or removed: channels."""
        return self.width

    def down_weight(self) -> np.ndarray:
        return constant_array(self.down.inputs[1])

    def channels(self, units: np.ndarray) -> np.ndarray:
        """The channels of ``h`` that ``units`` keep: the same ones."""
        return units


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
    weight = None if matmul is None else matmul_weight(matmul)
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
    weight = matmul_weight(down)
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
        projection_weight = matmul_weight(node)
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
        bias=bias_of(down),
        residual=residual_of(down),
        activation="+".join(sorted({n.op_type for n in nodes if _key(n) in ACTIVATIONS})),
    )


def _key(node: ir.Node) -> tuple[str, str]:
    return ("" if is_standard(node) else node.domain, node.op_type)


def find_blocks(model: ir.Model) -> list[FfnBlock]:
    """Every feed-forward block of the main graph, in graph order."""
    return [block for node in model.graph if (block := block_at(node)) is not None]


def prune(
    rewrite: Rewrite,
    block: FfnBlock,
    keep: np.ndarray,
    down_weight: np.ndarray,
    intercept: np.ndarray | None,
) -> None:
    """Keep the channels ``keep`` (sorted indices) of ``block``; ``down_weight [len(keep), H]``
    replaces ``W_down`` and ``intercept [H]`` (None: no change) is added to its bias
    (``Rewrite.down``)."""
    kept = len(keep)
    for projection in block.projections:
        weight = constant_array(projection.node.inputs[1])
        columns = np.concatenate([part * block.width + keep for part in range(projection.parts)])
        rewrite.swap(projection.node, 1, weight[:, columns])
        out = projection.node.outputs[0]
        out.shape = resized(out.shape, kept * projection.parts)
        split = projection.split
        if split is None:
            continue
        widths = np.full(projection.parts, kept, dtype=np.int64)
        if len(split.inputs) > 1 and split.inputs[1] is not None:
            rewrite.swap(split, 1, widths)
        elif "split" in split.attributes:
            split.attributes["split"] = ir.AttrInt64s("split", widths.tolist())
    for node, index in block.channel_constants:
        rewrite.swap(node, index, constant_array(node.inputs[index])[..., keep])
    for value in block.values:
        value.shape = resized(value.shape, kept)
    rewrite.down(block.down, block.bias, down_weight, intercept)
