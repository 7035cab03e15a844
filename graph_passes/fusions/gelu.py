"""Fuse the GELU activations exporters spell out into one Gelu / FastGelu node.

Two forms, each in the operand orders and groupings that torch (legacy and dynamo), HF and
optimum emit::

    erf:   e = Erf(Div(x, 1.41421356))  (or Mul(x, 0.70710678))
           y = 0.5 * x * (1 + e)        (0.5 applied last, to the bracket, or to x first)
    tanh:  c = Pow(x, 3)  (or x*x*x)
           t = Tanh(0.7978845608 * (x + 0.044715 * c))
           y = 0.5 * x * (1 + t)
    after: y = Gelu(x)                  (erf)    y = FastGelu(x) / Gelu<approximate="tanh">(x)

The math is the definition: ``gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))`` and its
tanh approximation with ``sqrt(2 / pi) = 0.7978845608``. Every constant is checked against
its exact value with a relative tolerance of 1e-4 (exporters round sqrt(2) to float32; a
model with 1.4 in its place is a different function and is left alone), must have one
element and rank <= 1 (a bigger rank would broadcast the output to another shape), and every
intermediate must be private to the pattern (one use, not a graph output).

Which op is emitted depends on the target: ``cpu``/``cuda`` get ``com.microsoft`` Gelu or
FastGelu when ``self.target.supports`` says a kernel exists; otherwise (and always for
``portable``) the standard ``Gelu`` (opset 20) with ``approximate="none"|"tanh"``. Below
opset 20 without a contrib kernel a match is counted in ``blocked`` and left as it is.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from graph_passes.fusion import Emits, ExpectedRow, Fusion
from graph_passes.match import (
    is_op,
    is_scalar_const,
    only_use,
    opset_of,
    probe_node,
    producer,
    rewrite,
    split_const,
)
from graph_passes.shapes import infer_shapes
from graph_passes.target.targets import CONTRIB_DOMAIN

logger = logging.getLogger(__name__)

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
KAPPA = 0.044715
GELU_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class GeluMatch:
    """A matched GELU: its input, output-producing node, every node of it, and its form."""

    x: ir.Value
    root: ir.Node  # the node whose output is y
    nodes: list[ir.Node]
    approximate: str  # "none" (erf) or "tanh"


def match_gelu(node: ir.Node) -> GeluMatch | None:
    """The GELU pattern around ``node`` when it is its Erf or Tanh, else None."""
    if is_op(node, "Erf"):
        inner = match_erf_input(node)
        approximate = "none"
    elif is_op(node, "Tanh"):
        inner = match_tanh_input(node)
        approximate = "tanh"
    else:
        return None
    if inner is None:
        return None
    x, inner_nodes = inner
    plus = only_use(node.outputs[0])
    if not is_op(plus, "Add") or split_const(plus, 1.0) is not node.outputs[0]:
        return None
    outer = match_half_product(x, plus.outputs[0])
    if outer is None:
        return None
    root, outer_nodes = outer
    nodes = [*inner_nodes, node, plus, *outer_nodes]
    if not _valid(x, nodes, root):
        return None
    return GeluMatch(x, root, nodes, approximate)


def match_erf_input(erf: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """``x`` of ``Erf(x / sqrt(2))`` (Div by sqrt(2) or Mul by 1/sqrt(2))."""
    scaled = producer(erf.inputs[0], "Div", "Mul")
    if scaled is None or only_use(scaled.outputs[0]) is not erf:
        return None
    if scaled.op_type == "Div":
        x = scaled.inputs[0] if is_scalar_const(scaled.inputs[1], SQRT2) else None
    else:
        x = split_const(scaled, 1.0 / SQRT2)
    return None if x is None else (x, [scaled])


def match_tanh_input(tanh: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """``x`` of ``Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))``."""
    outer = producer(tanh.inputs[0], "Mul")
    inner = split_const(outer, SQRT_2_OVER_PI)
    add = producer(inner, "Add")
    if add is None or only_use(inner) is not outer:
        return None
    for x, w in (add.inputs, add.inputs[::-1]):
        scale = producer(w, "Mul")
        if x is None or scale is None or only_use(w) is not add:
            continue
        cube = split_const(scale, KAPPA)
        cube_nodes = None if cube is None else _cube(cube, x)
        if cube_nodes is not None and only_use(cube) is scale:
            return x, [*cube_nodes, scale, add, outer]
    return None


def _cube(value: ir.Value | None, x: ir.Value) -> list[ir.Node] | None:
    """Nodes computing ``x^3`` into ``value``: Pow(x, 3), Mul(x, Mul(x, x)), Mul(Mul(x, x), x)."""
    node = producer(value, "Pow", "Mul")
    if node is None:
        return None
    if node.op_type == "Pow":
        return [node] if node.inputs[0] is x and is_scalar_const(node.inputs[1], 3.0) else None
    for a, b in (node.inputs, node.inputs[::-1]):
        square = producer(b, "Mul")
        if a is x and square is not None and list(square.inputs) == [x, x]:
            if only_use(b) is node:
                return [square, node]
    return None


def match_half_product(x: ir.Value, bracket: ir.Value) -> tuple[ir.Node, list[ir.Node]] | None:
    """The product ``0.5 * x * bracket`` in any grouping: (node producing it, its nodes)."""
    first = only_use(bracket)
    if not is_op(first, "Mul"):
        return None
    other = _other(first, bracket)
    if other is x or is_scalar_const(other, 0.5):
        second = only_use(first.outputs[0])
        if not is_op(second, "Mul"):
            return None
        if other is x:  # (x * b) * 0.5
            ok = split_const(second, 0.5) is first.outputs[0]
        else:  # x * (0.5 * b)
            ok = _other(second, first.outputs[0]) is x
        return (second, [first, second]) if ok else None
    half = producer(other, "Mul")  # (0.5 * x) * b
    if half is not None and split_const(half, 0.5) is x and only_use(other) is first:
        return first, [half, first]
    return None


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    a, b = node.inputs
    if a is value:
        return b
    return a if b is value else None


def _valid(x: ir.Value, nodes: list[ir.Node], root: ir.Node) -> bool:
    """dtype, rank and graph checks; logs why a match is rejected."""
    reason = None
    if x.dtype not in GELU_TYPES:
        reason = f"x dtype {x.dtype} is not float/float16/bfloat16"
    elif x.shape is None or len(x.shape) == 0:
        reason = "x rank unknown or 0 (a rank-1 constant would broadcast it)"
    elif any(n.graph is not root.graph for n in nodes):
        reason = "nodes span graphs"
    elif any(n.outputs[0].is_graph_output() for n in nodes if n is not root):
        reason = "an intermediate is a graph output"
    if reason is not None:
        logger.debug("GELU at %s not fused: %s", root.name, reason)
    return reason is None


class FuseGelu(Fusion):
    """Erf/Tanh GELU subgraphs -> com.microsoft Gelu/FastGelu or standard Gelu (opset 20)."""

    name: ClassVar[str] = "fuse_gelu"
    position: ClassVar[int] = 110
    runs_after: ClassVar[tuple[str, ...]] = ("raise_opset",)
    emits: ClassVar[Emits] = Emits(
        contrib=frozenset({"Gelu", "FastGelu"}),
        cuda=frozenset({"Gelu", "FastGelu"}),
        standard={"Gelu": 20},
    )
    shadows: ClassVar[tuple[str, ...]] = ("GeluFusion", "FastGeluFusion")
    expected: ClassVar[ExpectedRow] = ExpectedRow("gelu", frozenset({"Gelu", "FastGelu"}))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.blocked = 0  # matched, but neither a contrib kernel nor opset 20 is available
        self.declined = 0  # fused forms measured slower on the target than the pattern
        opset = opset_of(model)
        infer_shapes(model)
        for graph in model.graphs():
            for node in list(graph):
                if node.graph is not graph:  # removed by an earlier rewrite
                    continue
                match = match_gelu(node)
                if match is None:
                    continue
                declined = self.declined
                fused = self._fused_node(match, opset, model)
                if fused is None:
                    self.blocked += self.declined == declined
                    continue
                if rewrite(graph, match.root, match.nodes, fused):
                    self.matches += 1
        if self.blocked:
            logger.info("%d GELU patterns left: no contrib kernel and opset < 20", self.blocked)
        return self.result(model)

    def _fused_node(self, match: GeluMatch, opset: int, model: ir.Model) -> ir.Node | None:
        """The contrib op where the target has a kernel, else standard Gelu (opset 20);
        either only where the target does not measure it slower than the pattern."""
        contrib_op = "Gelu" if match.approximate == "none" else "FastGelu"
        name = match.root.name
        contrib = probe_node(CONTRIB_DOMAIN, contrib_op, [match.x])
        if self.target.allows_contrib and self.can_emit(contrib):
            if self._pays(match, contrib):
                model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
                return ir.Node(CONTRIB_DOMAIN, contrib_op, [match.x], name=name)
        if self.can_emit_standard("Gelu", opset):
            attrs = [ir.AttrString("approximate", match.approximate)]
            if self._pays(match, probe_node("", "Gelu", [match.x], attrs)):
                return ir.Node("", "Gelu", [match.x], attrs, name=name)
        return None

    def _pays(self, match: GeluMatch, probe: ir.Node) -> bool:
        if self.rewrite_pays(match.nodes, [match.root.outputs[0]], [probe], [probe.outputs[0]]):
            return True
        self.declined += 1
        return False
