"""Matching helpers for attention fusions: head layouts, Q/K/V projections, mask biases.

Exporters split heads with very different op chains (``Reshape``+``Transpose`` in the legacy
exporter, ``Reshape``/``Transpose``/``Reshape`` through a 3-D view for K in the dynamo
exporter, with shapes built at run time from ``Shape``/``Gather``/``Slice``/``Concat``). So
instead of listing chains, each tensor on the way is given a *layout*: the tuple of its axes,
each axis the tuple of *atoms* it holds in row-major order (``b`` batch, ``s`` sequence, ``h``
heads, ``d`` head size, ``e`` model width). A projection output is ``((b,), (s,), (h, d))``;
``Transpose`` permutes axes; ``Reshape`` regroups the flat atom sequence, which is only proven
when every entry of its shape vector is explained (a constant whose size matches the atoms it
takes, a dimension read with ``Shape`` from a tensor whose layout or symbolic dim is known, 0
that copies, or one -1 that takes the rest). A chain is accepted when it ends in the exact
layout attention needs (Q ``[b, h, s, d]``, K ``[b, h, d, s]``, V ``[b, h, s, d]``, output
``[b, s, (h, d)]``): a reshape to the wrong head count or size cannot be explained and fails.

These are plain functions so other attention fusions (decoder attention) can reuse them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array, is_standard
from graph_passes.shapes import dim_of, shape_entries

logger = logging.getLogger(__name__)

Axis = tuple[str, ...]
Layout = tuple[Axis, ...]
Size = int | str | None  # int, symbolic dim name, or unknown

Q_LAYOUT: Layout = (("b",), ("h",), ("s",), ("d",))
K_T_LAYOUT: Layout = (("b",), ("h",), ("d",), ("s",))
V_LAYOUT: Layout = Q_LAYOUT
OUT_LAYOUT: Layout = (("b",), ("s",), ("h", "d"))
HIDDEN_LAYOUT: Layout = (("b",), ("s",), ("e",))

# Every op an attention layer may end up as (ours, ORT's transformers' or an exporter's): what
# counts as "attention fused" in the expected-fusion report.
ATTENTION_OPS = frozenset(
    {
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "PackedAttention",
        "PackedMultiHeadAttention",
        "DecoderMaskedMultiHeadAttention",
    }
)


def is_op(node: ir.Node | None, *ops: str) -> bool:
    """True for a standard-domain node of one of ``ops``."""
    return node is not None and node.op_type in ops and is_standard(node)


def producer(value: ir.Value | None, *ops: str) -> ir.Node | None:
    """The value's producer when it is a standard node of one of ``ops``."""
    node = None if value is None else value.producer()
    return node if is_op(node, *ops) else None


dim_size = dim_of  # static size of an axis: an int, a symbolic name, or None


def scalar_constant(value: ir.Value | None) -> float | None:
    """The value of a one-element constant, else None."""
    array = constant_array(value)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    return float(array.reshape(-1)[0])


# -- layouts ---------------------------------------------------------------------------


@dataclass
class LayoutTracker:
    """Layouts known so far, and the static sizes of the atoms."""

    sizes: dict[str, Size]
    layouts: dict[ir.Value, Layout] = field(default_factory=dict)

    def entry_token(self, entry: tuple) -> tuple | None:
        """Resolve one shape-vector entry to ("atoms", axis) | ("int", k) | ("sym", name)."""
        if entry[0] == "int":
            return entry
        _, value, axis = entry
        layout = self.layouts.get(value)
        if layout is not None and axis < len(layout):
            return ("atoms", layout[axis])
        size = dim_size(value, axis)
        if isinstance(size, int):
            return ("int", size)
        if isinstance(size, str):
            return ("sym", size)
        return None

    def reshape(self, layout: Layout, entries: list[tuple], allowzero: int) -> Layout | None:
        """The layout after ``Reshape(x, shape)``, or None when it cannot be proven."""
        atoms = [a for axis in layout for a in axis]
        tokens: list[tuple | None] = []
        for i, entry in enumerate(entries):
            if entry[0] == "int" and entry[1] == 0 and not allowzero:
                tokens.append(("atoms", layout[i]) if i < len(layout) else None)
            elif entry[0] == "int" and entry[1] == -1:
                tokens.append(("rest",))
            else:
                tokens.append(self.entry_token(entry))
        if any(t is None for t in tokens) or sum(t[0] == "rest" for t in tokens) > 1:
            return None
        rest = next((i for i, t in enumerate(tokens) if t[0] == "rest"), None)
        head = tokens if rest is None else tokens[:rest]
        out: list[Axis | None] = []
        pos = 0
        for token in head:
            taken = self._take(token, atoms[pos:])
            if taken is None:
                return None
            out.append(taken)
            pos += len(taken)
        if rest is None:
            return tuple(out) if pos == len(atoms) else None  # type: ignore[arg-type]
        tail_out: list[Axis] = []
        end = len(atoms)
        for token in reversed(tokens[rest + 1 :]):
            taken = self._take(token, atoms[pos:end][::-1], reverse=True)
            if taken is None:
                return None
            tail_out.insert(0, taken[::-1])
            end -= len(taken)
        if end < pos:
            return None
        return (*out, tuple(atoms[pos:end]), *tail_out)  # type: ignore[misc]

    def _take(self, token: tuple, atoms: list[str], reverse: bool = False) -> Axis | None:
        """The atoms ``token`` takes from the front of ``atoms`` (reversed atoms from the
        back when ``reverse``), or None."""
        kind = token[0]
        if kind == "atoms":
            want = tuple(token[1])[::-1] if reverse else tuple(token[1])
            return want if tuple(atoms[: len(want)]) == want else None
        if kind == "sym":
            if atoms and self.sizes.get(atoms[0]) == token[1]:
                return (atoms[0],)
            return None
        k = token[1]
        if k == 1:
            return (atoms[0],) if atoms and self.sizes.get(atoms[0]) == 1 else ()
        taken: list[str] = []
        product = 1
        for atom in atoms:
            if product >= k:
                break
            size = self.sizes.get(atom)
            if not isinstance(size, int) or size < 1:
                return None
            taken.append(atom)
            product *= size
        return tuple(taken) if product == k and taken else None

    def follow(self, node: ir.Node, layout: Layout) -> Layout | None:
        """The layout of ``node``'s output given its data input's layout."""
        if node.op_type in ("Mul", "Div"):
            return layout
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            if perm is None:
                perm = list(range(len(layout)))[::-1]
            if sorted(perm) != list(range(len(layout))):
                return None
            return tuple(layout[p] for p in perm)
        if node.op_type == "Reshape":
            entries = shape_entries(node.inputs[1])
            if entries is None:
                return None
            return self.reshape(layout, entries, node.attributes.get_int("allowzero", 0))
        return None


# -- chains ----------------------------------------------------------------------------


@dataclass
class Chain:
    """A head-splitting chain from a source (a projection output) to an attention operand."""

    source: ir.Value
    nodes: list[ir.Node]  # in data-flow order, source excluded
    scale: float  # product of the scalar Mul/Div factors along the chain


def walk_back(value: ir.Value) -> Chain | None:
    """Follow ``Reshape``/``Transpose``/scalar ``Mul``/``Div`` producers back to their source."""
    nodes: list[ir.Node] = []
    scale = 1.0
    current = value
    while True:
        node = producer(current, "Reshape", "Transpose", "Mul", "Div")
        if node is None:
            break
        if node.op_type == "Mul":
            data, factor = _scalar_operand(node)
            if data is None:
                break
            scale *= factor
        elif node.op_type == "Div":
            factor = scalar_constant(node.inputs[1])
            if factor is None or factor == 0.0:
                break
            data, scale = node.inputs[0], scale / factor
        else:
            data = node.inputs[0]
        nodes.append(node)
        current = data
    if current is None:
        return None
    return Chain(current, nodes[::-1], scale)


def _scalar_operand(node: ir.Node) -> tuple[ir.Value | None, float]:
    """For ``Mul(x, c)`` with ``c`` a one-element constant: ``(x, c)``."""
    for data, other in (node.inputs, node.inputs[::-1]):
        factor = scalar_constant(other)
        if factor is not None and constant_array(data) is None:
            return data, factor
    return None, 1.0


def chain_layout(tracker: LayoutTracker, chain: Chain) -> Layout | None:
    """Follow ``chain`` from its source's known layout, recording every intermediate's."""
    layout = tracker.layouts.get(chain.source)
    for node in chain.nodes:
        if layout is None:
            return None
        layout = tracker.follow(node, layout)
        if layout is not None:
            tracker.layouts[node.outputs[0]] = layout
    return layout


def walk_forward(tracker: LayoutTracker, value: ir.Value, target: Layout) -> list[ir.Node] | None:
    """Single-use ``Transpose``/``Reshape`` consumers of ``value`` until ``target`` layout.

    Uses by ``Shape`` nodes are ignored here; the caller must check where they lead.
    """
    nodes: list[ir.Node] = []
    layout = tracker.layouts.get(value)
    current = value
    while layout != target:
        # Shape readers are allowed here (legacy exports read the merged shape that way); the
        # caller checks they only feed the pattern.
        uses = [u for u in current.uses() if not is_op(u.node, "Shape")]
        if len(uses) != 1 or current.is_graph_output():
            return None
        node = uses[0].node
        if not is_op(node, "Transpose", "Reshape") or uses[0].idx != 0 or layout is None:
            return None
        layout = tracker.follow(node, layout)
        if layout is None:
            return None
        current = node.outputs[0]
        tracker.layouts[current] = layout
        nodes.append(node)
    return nodes


# -- projections -----------------------------------------------------------------------


@dataclass
class Projection:
    """``y = MatMul(x, weight) [+ bias]``: how Q, K and V are computed from the hidden states.

    Or one block of columns of a packed projection, ``Split(MatMul(x, weight) [+ bias])``
    [+ bias]: ``fuse_packed_matmuls`` writes Q/K/V that way (its bias Adds after the Split),
    and so does a module with one ``in_proj`` weight (its bias before the Split). Then
    ``columns`` are this projection's columns of ``weight`` (and of ``bias`` when
    ``bias_packed``), and ``split`` / a packed ``add`` are shared with its siblings.
    """

    x: ir.Value
    weight: ir.Value
    bias: ir.Value | None
    matmul: ir.Node
    add: ir.Node | None
    split: ir.Node | None = None
    columns: slice | None = None
    bias_packed: bool = False

    @property
    def nodes(self) -> list[ir.Node]:
        after = (self.add, self.split) if self.bias_packed else (self.split, self.add)
        return [self.matmul, *(n for n in after if n is not None)]

    def weight_array(self) -> np.ndarray | None:
        """This projection's constant weight ([E_in, E]), else None."""
        array = constant_array(self.weight)
        return array if array is None or self.columns is None else array[..., self.columns]

    def bias_array(self) -> np.ndarray | None:
        """This projection's constant bias, else None (also when there is none)."""
        array = constant_array(self.bias)
        if array is None or not self.bias_packed or self.columns is None:
            return array
        return array[..., self.columns]


def projection_nodes(projections: list[Projection]) -> list[ir.Node]:
    """The nodes of ``projections``, each once (packed ones share their MatMul and Split)."""
    return list(dict.fromkeys(n for p in projections for n in p.nodes))


def match_projection(value: ir.Value) -> Projection | None:
    """``value = MatMul(x, W) + bias`` (either Add order) or ``MatMul(x, W)``, either of them
    possibly one block of a packed projection's ``Split``; else None."""
    add = producer(value, "Add")
    if add is not None:
        for a, b in (add.inputs, add.inputs[::-1]):
            found = _product(a)
            if found is not None and b is not None and _product(b) is None:
                if found.bias is not None:
                    return None  # a bias on each side of the Split: not a plain projection
                found.add, found.bias = add, b
                return found
        return None
    return _product(value)


def _product(value: ir.Value | None) -> Projection | None:
    """``MatMul(x, W)``, or a block of ``Split(MatMul(x, W) [+ bias], axis=-1)`` (bias-less
    when not packed: the caller adds the projection's own)."""
    split = producer(value, "Split")
    columns = None
    if split is not None:
        columns = _split_columns(split, split.outputs.index(value))
        value = split.inputs[0]
        if columns is None:
            return None
    add = producer(value, "Add") if split is not None else None
    bias = None
    if add is not None:
        for a, b in (add.inputs, add.inputs[::-1]):
            if producer(a, "MatMul") is not None and b is not None:
                value, bias = a, b
                break
        else:
            return None
    matmul = producer(value, "MatMul")
    if matmul is None or matmul.inputs[0] is None or matmul.inputs[1] is None:
        return None
    x, weight = matmul.inputs
    if split is not None and not _columns_fit(weight, split):
        return None
    return Projection(x, weight, bias, matmul, add, split, columns, bias_packed=add is not None)


def _split_columns(split: ir.Node, index: int) -> slice | None:
    """The columns output ``index`` of a last-axis ``Split`` takes (explicit sizes only)."""
    data = split.inputs[0]
    axis = split.attributes.get_int("axis", 0)
    rank = None if data is None or data.shape is None else len(data.shape)
    if axis != -1 and (rank is None or axis != rank - 1):
        return None
    sizes = split.attributes.get_ints("split", None)
    if sizes is None and len(split.inputs) > 1:
        array = constant_array(split.inputs[1])
        sizes = None if array is None else [int(v) for v in array.reshape(-1)]
    if sizes is None or len(sizes) != len(split.outputs) or min(sizes) < 1:
        return None
    start = sum(sizes[:index])
    return slice(start, start + sizes[index])


def _columns_fit(weight: ir.Value, split: ir.Node) -> bool:
    """Whether the Split's blocks tile the weight's last axis exactly."""
    width = dim_size(weight, -1)
    total = _split_columns(split, len(split.outputs) - 1)
    return isinstance(width, int) and total is not None and total.stop == width


# -- masks -----------------------------------------------------------------------------


@dataclass
class MaskBias:
    """An additive bias ``(1 - m) * fill`` (or its ``Where`` form) from a 2-D 0/1 mask ``m``."""

    mask: ir.Value  # [batch, key_sequence], any int/float/bool type
    fill: float  # added where m == 0 (finfo.min or -10000 in today's exporters)


def match_mask_bias(bias: ir.Value) -> MaskBias | None:
    """Recognize the mask bias exporters compute from ``attention_mask``; else None.

    Accepted (``C`` being ``m`` through Unsqueeze/Cast/Expand to ``[b, 1, 1|s, s]``)::

        Mul(Sub(1, C), fill)                          (eager: transformers' inverted mask)
        Where(Cast<bool>(Sub(1, C)), fill, Sub(1, C))  (sdpa / optimum: masked_fill)

    Both give 0 where m == 1 and ``fill`` where m == 0 (masks are 0/1 by contract).
    """
    node = bias.producer()
    if is_op(node, "Mul"):
        for a, b in (node.inputs, node.inputs[::-1]):
            fill = scalar_constant(b)
            sub = producer(a, "Sub")
            if fill is not None and sub is not None:
                mask = _one_minus_mask(sub)
                return None if mask is None else MaskBias(mask, fill)
        return None
    if is_op(node, "Where"):
        cond, fill_value, other = node.inputs
        fill = scalar_constant(fill_value)
        cast = producer(cond, "Cast")
        sub = producer(other, "Sub")
        if fill is None or cast is None or sub is None or cast.inputs[0] is not other:
            return None
        if cast.attributes.get_int("to", 0) != ir.DataType.BOOL:
            return None
        mask = _one_minus_mask(sub)
        return None if mask is None else MaskBias(mask, fill)
    return None


def _one_minus_mask(sub: ir.Node) -> ir.Value | None:
    one = scalar_constant(sub.inputs[0])
    if one != 1.0 or sub.inputs[1] is None:
        return None
    return _mask_source(sub.inputs[1])


def _mask_source(value: ir.Value) -> ir.Value | None:
    """The 2-D mask behind Unsqueeze/Cast/Expand that puts it at ``[b, 1, 1, s]``."""
    chain: list[ir.Node] = []
    current = value
    while True:
        node = producer(current, "Unsqueeze", "Cast", "Expand")
        if node is None:
            break
        chain.append(node)
        current = node.inputs[0]
    if current is None or current.shape is None or len(current.shape) != 2:
        return None
    dtype = current.dtype
    if dtype is None or not (
        dtype.is_floating_point() or dtype.is_integer() or dtype == ir.DataType.BOOL
    ):
        return None
    positions, rank = [0, 1], 2
    for node in reversed(chain):
        if node.op_type == "Cast":
            continue
        if node.op_type == "Expand":
            target = node.inputs[1]
            n = None if target is None or target.shape is None else target.shape[0]
            if not isinstance(n, int) or n > rank:
                return None  # a longer target would prepend axes
            continue
        axes = node.attributes.get_ints("axes", None)
        if axes is None and len(node.inputs) > 1:
            array = constant_array(node.inputs[1])
            axes = None if array is None else [int(a) for a in array.reshape(-1)]
        if axes is None:
            return None
        new_rank = rank + len(axes)
        axes = sorted(a % new_rank for a in axes)
        kept = [i for i in range(new_rank) if i not in axes]
        positions = [kept[p] for p in positions]
        rank = new_rank
    if rank != 4 or positions != [0, 3]:
        return None
    return current
