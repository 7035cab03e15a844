"""Fold constant subgraphs into initializers, without growing the model or touching QDQ.

Every standard-domain node whose inputs are all true constants (initializers that are not
graph inputs, ``Constant`` outputs) or outputs of other such nodes is evaluated, the whole
constant subgraph in ONE ONNX Runtime session (CPU, optimizations off; node by node only
when that fails, see graph_passes/constant_eval.py). Each "frontier" value (one read by a
node that is not folded, by a subgraph, or a graph output) becomes a new initializer, and
folded nodes left without uses are removed (constants they read are left for
``remove_dead``).

What is never folded, and why:

* Random ops (RandomNormal ..., Multinomial, Bernoulli, Dropout): a different value per run.
* If/Loop/Scan and any node with a subgraph attribute; custom and non-standard domains
  (ai.onnx.ml, com.microsoft): ORT may lack them, and they are not ours to evaluate.
* ``Constant`` nodes themselves: they already are constants (but they feed folds).
* (Dynamic)QuantizeLinear / DequantizeLinear, and everything downstream of a DQ: folding
  DQ of int8 weights turned a 23 MB quantized model into a 90 MB one that ran 3x slower;
  QDQ pairs must survive for ORT to pick its int8 kernels.
* Values that would grow the model (``ConstantOfShape``, ``Tile``, ``Expand`` of small
  constants): a folded value must fit in ``max(SMALL_BYTES, bytes of the constants it
  frees)``. Shapes known statically are checked before evaluating (no giant allocations),
  the real size after. The freed bytes are a budget shared by all values folded from the
  same constants, and only constants read solely by folded nodes count as freed.

Subgraph bodies are folded too: a node reading constants of its own graph or outer-scope
initializers is folded into an initializer of that subgraph. A folded graph output keeps
its name, dtype and declared shape. New initializer names derive from the folded value's
name, so folding is deterministic; a second application finds nothing to do.
"""

from __future__ import annotations

import logging
import math

import onnx_ir as ir

from graph_passes import constant_eval
from graph_passes.base import NON_DETERMINISTIC_OPS, GraphPass, constant_tensor, is_standard
from graph_passes.match import fresh_name

logger = logging.getLogger(__name__)

SMALL_BYTES = 1024  # any folded value up to this size is accepted

# Random ops (fresh values per run), Dropout (random in training mode), Constant (already a
# constant) and quantization ops (QDQ pairs must survive for ORT's int8 kernels).
NEVER_FOLD = NON_DETERMINISTIC_OPS | {
    "Constant",
    "Dropout",
    "DequantizeLinear",
    "QuantizeLinear",
    "DynamicQuantizeLinear",
}

_SUBGRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)

Cones = dict[ir.Value, frozenset[ir.Value]]  # folded value -> the true constants it reads
Constants = dict[ir.Value, ir.TensorProtocol]  # true constant -> its tensor
Tensors = dict[ir.Value, ir.TensorProtocol]  # folded value -> its computed tensor


class FoldConstants(GraphPass):
    """Evaluate constant subgraphs with ONNX Runtime and store the results as initializers.

    Fewer nodes to run and a simpler graph for the fusions that follow. One ORT session
    per graph keeps it fast on big weights; random, quantization, custom-domain and
    control-flow ops are never folded, and no folded value may grow the model.
    """

    name = "fold_constants"
    # fold_shapes turns Shape ops into constants this pass folds in the same iteration
    runs_after = ("fold_shapes",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        names = _all_names(model)
        for graph in list(model.graphs()):  # main graph first: subgraphs see its results
            self.matches += _fold_graph(graph, model, names)
        return self.result(model)


def _fold_graph(graph: ir.Graph, model: ir.Model, names: set[str]) -> int:
    """Fold what can be folded in one graph; returns the number of values folded."""
    graph.sort()
    nodes, cones, constants = _select(graph)
    frontier = _frontier(nodes)
    if not frontier:
        return 0
    try:
        tensors = constant_eval.evaluate(nodes, frontier, model, constants)
    except Exception as exc:
        logger.debug(
            "one session for %d constant nodes of graph %r failed (%s); evaluating node by node",
            len(nodes),
            graph.name,
            " ".join(str(exc).split())[:300],
        )
        tensors = constant_eval.evaluate_each(nodes, model, constants)
        nodes = [n for n in nodes if all(v in tensors for v in _needed(n))]
        frontier = _frontier(nodes)
    accepted = _size_guard(frontier, tensors, cones, constants, set(nodes))
    if not accepted:
        return 0
    for value in accepted:
        _replace_with_initializer(graph, value, tensors[value], names)
    for node in reversed(nodes):
        if not any(v.uses() or v.is_graph_output() for v in node.outputs):
            graph.remove(node, safe=True)
    return len(accepted)


def _foldable_op(node: ir.Node) -> bool:
    return (
        is_standard(node)
        and node.op_type not in NEVER_FOLD
        and not any(attr.type in _SUBGRAPH_ATTRS for attr in node.attributes.values())
    )


def _select(graph: ir.Graph) -> tuple[list[ir.Node], Cones, Constants]:
    """Foldable nodes of a sorted graph in order, the constants each of their outputs
    reads, and the tensors of those constants."""
    nodes: list[ir.Node] = []
    cones: Cones = {}
    constants: Constants = {}
    for node in graph:
        if not _foldable_op(node):
            continue
        leaves: set[ir.Value] = set()
        for value in node.inputs:
            if value is None:
                continue
            if value in cones:
                leaves |= cones[value]
            elif value in constants or _add_constant(value, constants):
                leaves.add(value)
            else:
                break
        else:
            cone = frozenset(leaves)
            limit = max(SMALL_BYTES, sum(constants[leaf].nbytes for leaf in cone))
            too_big = [v.name for v in node.outputs if _static_nbytes(v) > limit]
            if too_big:
                logger.debug(
                    "not folding %s: %s would exceed %d bytes", node.op_type, too_big, limit
                )
                continue
            nodes.append(node)
            cones.update((v, cone) for v in node.outputs)
    return nodes, cones, constants


def _add_constant(value: ir.Value, constants: Constants) -> bool:
    tensor = constant_tensor(value)
    if tensor is not None:
        constants[value] = tensor
    return tensor is not None


def _frontier(nodes: list[ir.Node]) -> list[ir.Value]:
    """Outputs of ``nodes`` read by anything else (other nodes, subgraphs) or graph outputs."""
    folded = set(nodes)
    return [
        value
        for node in nodes
        for value in node.outputs
        if value.is_graph_output() or any(use.node not in folded for use in value.uses())
    ]


def _needed(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.outputs if v.uses() or v.is_graph_output()]


def _static_nbytes(value: ir.Value) -> int:
    """Size from the value's static shape and dtype; 0 when unknown."""
    shape, dtype = value.shape, value.dtype
    if shape is None or dtype is None or not all(isinstance(d, int) for d in shape):
        return 0
    try:
        return math.ceil(math.prod(shape) * dtype.itemsize)
    except TypeError:
        return 0


def _size_guard(
    frontier: list[ir.Value],
    tensors: Tensors,
    cones: Cones,
    constants: Constants,
    folded: set[ir.Node],
) -> list[ir.Value]:
    """Frontier values that were computed and do not grow the model, in order.

    A constant is only freed when every value folded from it is accepted: a rejected value
    keeps its nodes, and so its constants. Rejections therefore shrink the budget and the
    choice is repeated until it is stable (the budget only shrinks, so this terminates).
    """
    freed = {
        leaf: constants[leaf].nbytes
        for value in frontier
        for leaf in cones[value]
        if _freed_by_fold(leaf, folded)
    }
    while True:
        accepted = _within_budget(frontier, tensors, cones, dict(freed))
        kept = {
            leaf
            for value in frontier
            if value not in accepted
            for leaf in cones[value]
            if leaf in freed
        }
        if not kept:
            return accepted
        for leaf in kept:
            del freed[leaf]


def _within_budget(
    frontier: list[ir.Value],
    tensors: Tensors,
    cones: Cones,
    budget: dict[ir.Value, int],
) -> list[ir.Value]:
    """Accept values in order; one bigger than SMALL_BYTES spends its constants' budget."""
    accepted = []
    for value in frontier:
        tensor = tensors.get(value)
        if tensor is None or not _fits_declared(value, tensor):
            continue
        size = tensor.nbytes
        if size > SMALL_BYTES:
            mine = sorted(
                (leaf for leaf in cones[value] if budget.get(leaf)),
                key=lambda leaf: leaf.name or "",
            )
            if size > sum(budget[leaf] for leaf in mine):
                logger.debug("not folding %s: %d bytes would grow the model", value.name, size)
                continue
            for leaf in mine:
                spent = min(size, budget[leaf])
                budget[leaf] -= spent
                size -= spent
        accepted.append(value)
    return accepted


def _freed_by_fold(leaf: ir.Value, folded: set[ir.Node]) -> bool:
    """True when only folded nodes read the constant, so folding makes it dead."""
    return not leaf.is_graph_output() and all(use.node in folded for use in leaf.uses())


def _fits_declared(value: ir.Value, tensor: ir.TensorProtocol) -> bool:
    """A graph output's declared shape is a contract: the folded tensor must match it."""
    shape = value.shape
    if not value.is_graph_output() or shape is None:
        return True
    return len(shape) == len(tensor.shape) and all(
        not isinstance(d, int) or d == t for d, t in zip(shape, tensor.shape, strict=True)
    )


def _replace_with_initializer(
    graph: ir.Graph, value: ir.Value, tensor: ir.TensorProtocol, names: set[str]
) -> None:
    """Make ``tensor`` an initializer of ``graph`` and redirect every use of ``value`` to it."""
    if value.is_graph_output():  # keeps name, dtype and declared shape
        name, type_, shape = value.name, value.type, value.shape
        new = ir.Value(type=type_, shape=shape, const_value=tensor)
        value.replace_all_uses_with(new, replace_graph_outputs=True)
        value.name = fresh_name(f"{name}_unfolded", names)
        new.name = name
    else:
        name = fresh_name(f"{value.name or 'value'}_folded", names)
        new = ir.Value(
            name=name,
            type=ir.TensorType(tensor.dtype),
            shape=ir.Shape(tensor.shape),
            const_value=tensor,
        )
        value.replace_all_uses_with(new)
    tensor.name = new.name
    graph.register_initializer(new)


def _all_names(model: ir.Model) -> set[str]:
    """Every value name in every graph (names are unique model-wide in ONNX)."""
    names: set[str] = set()
    for graph in model.graphs():
        names.update(v.name for v in graph.inputs if v.name)
        names.update(graph.initializers)
        names.update(v.name for node in graph for v in node.outputs if v.name)
    return names
