"""Remove nodes that no graph output depends on, and initializers nothing uses."""

from __future__ import annotations

import logging

import onnx_ir as ir

from graph_passes.base import GraphPass

logger = logging.getLogger(__name__)


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def _liveness(outputs: list[ir.Value]) -> tuple[set[ir.Node], set[ir.Value]]:
    """Every node and value some value in ``outputs`` depends on, across graph boundaries.

    A live node needs its inputs and, when it owns subgraphs (If/Loop/Scan), those
    subgraphs' outputs; the producers of everything needed are live. A node inside a
    subgraph that its graph's outputs do not need does not keep outer values alive. Live
    values matter on their own: a branch may return an outer initializer directly, which
    makes it a subgraph output without any use.
    """
    live: set[ir.Node] = set()
    seen: set[ir.Value] = set()
    stack = [value for value in outputs if value is not None]
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        producer = value.producer()
        if producer is None or producer in live:
            continue
        live.add(producer)
        stack.extend(v for v in producer.inputs if v is not None)
        for graph in _subgraphs(producer):
            stack.extend(v for v in graph.outputs if v is not None)
    return live, seen


def _detach(node: ir.Node) -> None:
    """Drop the node's uses of its inputs, and those of every node in its subgraphs.

    ``Graph.remove(safe=True)`` only detaches the node itself, so a removed If whose
    branch read an outer value would leave that value "used" forever.
    """
    for graph in _subgraphs(node):
        for inner in graph:
            _detach(inner)
    for i in range(len(node.inputs)):
        node.replace_input_with(i, None)


class RemoveDead(GraphPass):
    """Remove nodes no graph output depends on, and unused initializers, in every graph.

    Written instead of wrapping onnx-ir's ``RemoveUnusedNodesPass``, which (1) only removes
    unused initializers of the main graph, (2) when it removes a dead If/Loop/Scan it does
    not detach the nodes of its subgraphs, so an outer value only those nodes read stays
    "used" and its dead producer is never removed, not even by a second call, and (3) also
    trims unused optional outputs of live nodes, which is not dead-code removal. Here a
    liveness analysis runs from the outputs of the main graph (and of each model-local
    function): a live node makes its inputs and its subgraphs' outputs live.

    Graph inputs are never removed, used or not: the signature is a contract. Initializers
    that are graph inputs or outputs are kept. ``matches`` counts removed nodes of graphs
    that survive (a removed If counts once, not with its branches) plus removed initializers.
    """

    name = "remove_dead"
    # collects what these leave behind
    runs_after = (
        "fold_constants",
        "remove_noops",
        "eliminate_common_subexpressions",
        "merge_duplicate_initializers",
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        live, needed = _liveness(list(model.graph.outputs))
        self._sweep(model.graph, live, needed)
        for function in model.functions.values():
            live, needed = _liveness(list(function.outputs))
            self._sweep(function, live, needed)
        return self.result(model)

    def _sweep(
        self, graph: ir.Graph | ir.Function, live: set[ir.Node], needed: set[ir.Value]
    ) -> None:
        """Clean the live nodes' subgraphs first (their dead nodes may read values of this
        graph), then remove this graph's dead nodes, then its unused initializers."""
        for node in graph:
            if node in live:
                for subgraph in _subgraphs(node):
                    self._sweep(subgraph, live, needed)
        dead = [node for node in graph if node not in live]
        if dead:
            for node in dead:
                _detach(node)
            graph.remove(dead, safe=True)
            self.matches += len(dead)
            logger.debug("removed %d dead nodes", len(dead))
        if not isinstance(graph, ir.Graph):
            return
        signature = frozenset(graph.inputs) | frozenset(graph.outputs)
        for name, value in list(graph.initializers.items()):
            if value not in signature and value not in needed and not value.uses():
                del graph.initializers[name]
                self.matches += 1
                logger.debug("removed unused initializer %s", name)
