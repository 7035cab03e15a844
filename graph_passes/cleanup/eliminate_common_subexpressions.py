"""Merge nodes that compute the same thing from the same values."""

from __future__ import annotations

import logging
from collections.abc import Hashable

import onnx_ir as ir

from graph_passes.base import NON_DETERMINISTIC_OPS, GraphPass, can_replace, replace_value

logger = logging.getLogger(__name__)

# Tensor attributes (Constant values) with more elements than this are not compared: their
# bytes would be held in the lookup table. Big equal weights are MergeDuplicateInitializers'.
TENSOR_SIZE_LIMIT = 1024

_SCALAR_TYPES = (ir.AttributeType.INT, ir.AttributeType.STRING)
_LIST_TYPES = (ir.AttributeType.INTS, ir.AttributeType.STRINGS)


class _Unmergeable(Exception):
    """The node must be left alone (random, owns a subgraph, big or odd attribute)."""


def _tensor_key(tensor: ir.TensorProtocol) -> Hashable:
    if tensor.size > TENSOR_SIZE_LIMIT:
        raise _Unmergeable("big tensor attribute")
    if tensor.dtype == ir.DataType.STRING:
        data: Hashable = tuple(tensor.string_data())  # type: ignore[attr-defined]
    else:
        data = tensor.tobytes()
    return (tensor.dtype, tuple(tensor.shape.numpy()), data)


def _attribute_key(attr: ir.Attr) -> Hashable:
    if attr.is_ref():  # inside a function: the value is the caller's
        return ("ref", attr.ref_attr_name, attr.type)
    if attr.type in _SCALAR_TYPES:
        return (attr.type, attr.value)
    if attr.type in _LIST_TYPES:
        return (attr.type, tuple(attr.value))
    # Floats by bit pattern: 0.0 == -0.0 in Python but they are different attributes.
    if attr.type == ir.AttributeType.FLOAT:
        return (attr.type, float(attr.value).hex())
    if attr.type == ir.AttributeType.FLOATS:
        return (attr.type, tuple(float(v).hex() for v in attr.value))
    if attr.type == ir.AttributeType.TENSOR:
        return (attr.type, _tensor_key(attr.as_tensor()))
    raise _Unmergeable(f"attribute of type {attr.type.name}")


def _calls_random(model: ir.Model, node: ir.Node, seen: set[ir.OperatorIdentifier]) -> bool:
    """Whether the node is random, or calls a model-local function that is."""
    if node.op_type in NON_DETERMINISTIC_OPS:
        return True
    if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
        return True  # training_mode given: a random mask unless it is False
    function = model.functions.get(node.op_identifier())
    if function is None or function.identifier() in seen:
        return False
    seen.add(function.identifier())
    return any(_calls_random(model, inner, seen) for inner in function)


def _node_key(model: ir.Model, node: ir.Node) -> Hashable:
    if not node.outputs:
        raise _Unmergeable("no outputs")
    if _calls_random(model, node, set()):
        raise _Unmergeable("non-deterministic")
    attributes = tuple(
        sorted((name, _attribute_key(attr)) for name, attr in node.attributes.items())
    )
    inputs = tuple(node.inputs)  # Values hash and compare by identity
    return (node.op_identifier(), len(node.outputs), inputs, attributes)


def _topological_order(graph: ir.Graph) -> list[ir.Node]:
    """The graph's nodes with every producer (in this graph) before its consumers.

    Computed here instead of ``graph.sort()`` so a call that merges nothing leaves the
    graph exactly as it was. A cycle (an invalid graph) keeps the remaining nodes in
    their current order.
    """
    nodes = list(graph)
    pending = {node: 0 for node in nodes}
    consumers: dict[ir.Node, list[ir.Node]] = {node: [] for node in nodes}
    for node in nodes:
        for producer in {v.producer() for v in node.inputs if v is not None}:
            if producer in pending:
                pending[node] += 1
                consumers[producer].append(node)
    ready = [node for node in reversed(nodes) if pending[node] == 0]
    order: list[ir.Node] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for consumer in reversed(consumers[node]):
            pending[consumer] -= 1
            if pending[consumer] == 0:
                ready.append(consumer)
    if len(order) < len(nodes):
        placed = set(order)
        order.extend(node for node in nodes if node not in placed)
    return order


class EliminateCommonSubexpressions(GraphPass):
    """Merge identical deterministic nodes (same op, same input values, same attributes).

    Two nodes with the same domain, op type and overload, the very same input values, equal
    attributes and the same number of outputs compute the same outputs, so the second is
    removed and its consumers read the first's outputs. Nodes are visited in topological
    order, so once two producers merge their consumers share inputs and merge in the same
    call: a duplicated chain collapses at once.

    Written instead of wrapping onnx-ir's ``CommonSubexpressionEliminationPass``, which only
    visits the main graph and inserts an Identity when a merged value is a graph output.
    Here every graph (If/Loop/Scan bodies too) is processed on its own: nodes of different
    graphs are never merged, while values from an outer scope are compared by identity
    like any other. Never merged: random ops (RandomNormal/Uniform[Like], Multinomial,
    Bernoulli, dropout in training mode, functions calling them), nodes owning subgraphs,
    and nodes with a tensor attribute over ``TENSOR_SIZE_LIMIT`` elements or an attribute
    type that is not compared (sparse tensors, type protos). Constant nodes with equal small
    tensors (dtype, shape and bytes) merge. When the duplicate's output is a graph output,
    the surviving value takes its name (the signature never changes); when the survivor is
    itself a graph input, output or initializer the duplicate stays.
    """

    name = "eliminate_common_subexpressions"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self._graph(model, model.graph)
        return self.result(model)

    def _graph(self, model: ir.Model, graph: ir.Graph) -> None:
        seen: dict[Hashable, ir.Node] = {}
        for node in _topological_order(graph):
            try:
                if any(
                    attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                    for attr in node.attributes.values()
                ):
                    raise _Unmergeable("owns a subgraph")
                key = _node_key(model, node)
            except _Unmergeable as reason:
                logger.debug("not merging %s: %s", node.name, reason)
                continue
            original = seen.get(key)
            if original is None:
                seen[key] = node
            elif self._merge(graph, original, node):
                self.matches += 1
        # Nodes owning subgraphs are never merged, so every subgraph is still in place.
        for node in graph:
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.GRAPH:
                    self._graph(model, attr.as_graph())
                elif attr.type == ir.AttributeType.GRAPHS:
                    for subgraph in attr.as_graphs():
                        self._graph(model, subgraph)

    @staticmethod
    def _merge(graph: ir.Graph, original: ir.Node, duplicate: ir.Node) -> bool:
        pairs = list(zip(duplicate.outputs, original.outputs, strict=True))
        if not all(can_replace(old, new) for old, new in pairs):
            logger.debug("keeping %s: its graph output cannot be renamed", duplicate.name)
            return False
        for old, new in pairs:
            replace_value(old, new)
        graph.remove(duplicate, safe=True)
        logger.debug("merged %s into %s", duplicate.name, original.name)
        return True
