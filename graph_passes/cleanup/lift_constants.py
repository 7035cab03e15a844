"""Turn standard ``Constant`` nodes into initializers, in every graph.

Before::

    c = Constant<value = float[4] {1, 2, 3, 4}>()
    y = Add(x, c)

After::

    initializer c = float[4] {1, 2, 3, 4}
    y = Add(x, c)

A Constant node is a weight spelled as a node: ONNX Runtime turns it into an initializer at
load time anyway, so the node only inflates the graph and hides the value from passes that
look for initializers. onnx-ir's ``LiftConstantsToInitializersPass`` does the rewrite (all
attribute forms, subgraph constants stay in their subgraph); this class adds what it lacks
for us: a match count, and leaving alone Constants that are graph outputs (an initializer
cannot be renamed into an output) and models with IR version < 4, where every initializer
must also be listed as a graph input.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes.base import GraphPass, is_standard

# IR version 4 dropped the rule that every initializer is also a graph input.
MIN_IR_VERSION = 4


def _liftable(model: ir.Model) -> int:
    return sum(
        1
        for graph in model.graphs()
        for node in graph
        if node.op_type == "Constant"
        and is_standard(node)
        and not node.outputs[0].is_graph_output()
    )


class LiftConstants(GraphPass):
    """Turn Constant nodes into initializers (ONNX Runtime does so at load anyway)."""

    name = "lift_constants"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        if model.ir_version < MIN_IR_VERSION:
            return self.result(model)
        before = _liftable(model)
        if before:
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(
                model
            )
            self.matches = before - _liftable(model)
        return self.result(model)
