"""RemoveDead: removes nodes no output needs and unused initializers in every graph, and
keeps the signature (unused inputs, initializers that are inputs or outputs)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes.cleanup.remove_dead import RemoveDead
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def graph_ops(graph: ir.Graph) -> list[str]:
    graph.sort()
    return [node.op_type for node in graph]


def branches(model: ir.Model) -> dict[str, ir.Graph]:
    node = next(n for n in model.graph if n.op_type == "If")
    return {name: attr.as_graph() for name, attr in node.attributes.items()}


def run(model: ir.Model) -> tuple[ir.Model, RemoveDead, bool]:
    pass_ = RemoveDead()
    candidate, result = apply_pass(pass_, model)
    return candidate, pass_, result.modified


def if_feeds(shape=(2, 4)) -> list[dict[str, np.ndarray]]:
    x = np.linspace(-2, 2, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    return [{"x": x, "c": np.array(flag)} for flag in (True, False)]


DEAD_CHAIN = (
    HEADER
    + """
g (float[N, 4] x, float[N, 4] unused) => (float[N, 4] y)
  <float[4] w = {1.0, 2.0, 3.0, 4.0}, float[4] dead_w = {5.0, 6.0, 7.0, 8.0}> {
  y = Add(x, w)
  d1 = Relu(x)
  d2 = Mul(d1, dead_w)
  d3 = Sigmoid(d2)
}
"""
)


def test_dead_chain_and_initializer_removed_unused_input_kept():
    model = model_from_text(DEAD_CHAIN)
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["Add"]
    assert list(candidate.graph.initializers) == ["w"]
    assert [v.name for v in candidate.graph.inputs] == ["x", "unused"]
    assert modified and pass_.matches == 4  # 3 nodes + 1 initializer
    assert_parity(model, candidate)
    check(candidate)


def test_idempotent():
    once, _, _ = run(model_from_text(DEAD_CHAIN))
    twice, pass_, modified = run(once)
    assert not modified and pass_.matches == 0
    assert op_list(twice) == ["Add"]
    check(twice)


def test_live_graph_keeps_everything_in_its_signature():
    # Nothing is dead: an output no node consumes, a multi-output node with one unused
    # output, initializers that are a graph input (overridable) and a graph output, and a
    # Dropout whose mask nobody reads (its optional output is not trimmed either).
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x, float[4] bias) => (float[N, 4] y, float[N, 2] z, float[4] w, float[N, 4] m)
  <float[4] bias = {0.5, 0.5, 0.5, 0.5}, float[4] w = {1.0, 2.0, 3.0, 4.0}> {
  y = Neg(x)
  k = Constant<value = int64[1] {2}>()
  z, idx = TopK(x, k)
  m, mask = Dropout(x)
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["Neg", "Constant", "TopK", "Dropout"]
    assert not modified and pass_.matches == 0
    assert sorted(candidate.graph.initializers) == ["bias", "w"]
    assert [v.name for v in candidate.graph.inputs] == ["x", "bias"]
    dropout = next(n for n in candidate.graph if n.op_type == "Dropout")
    assert len(dropout.outputs) == 2
    assert_parity(model, candidate)
    check(candidate)


def test_batchnorm_training_outputs_are_left_alone():
    # onnx-ir's RemoveUnusedNodesPass would trim these; ours does not touch live nodes.
    model = model_from_text(
        HEADER
        + """
g (float[2, 3, 4] x) => (float[2, 3, 4] y)
  <float[3] s = {1.0, 2.0, 3.0}, float[3] b = {0.0, 1.0, 0.0},
   float[3] mean = {0.0, 0.0, 0.0}, float[3] var = {1.0, 1.0, 1.0}> {
  y, rm, rv = BatchNormalization<training_mode = 1>(x, s, b, mean, var)
  dead = Relu(rm)
}
"""
    )
    candidate, pass_, _ = run(model)
    assert op_list(candidate) == ["BatchNormalization"]
    assert pass_.matches == 1
    assert len(candidate.graph.node(0).outputs) == 3
    assert_parity(model, candidate)
    check(candidate)


def test_subgraph_dead_node_and_initializer_removed():
    # t is only read by a dead node of the then branch, so it dies too; the outer
    # initializer v is only read by that dead node, u by a live one.
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x, bool c) => (float[N, 4] y)
  <float[4] u = {1.0, 1.0, 1.0, 1.0}, float[4] v = {2.0, 2.0, 2.0, 2.0}> {
  t = Neg(x)
  y = If(c) <
    then_branch = th () => (float[N, 4] o1)
      <float[4] sw = {1.0, 2.0, 3.0, 4.0}, float[4] dead_sw = {9.0, 9.0, 9.0, 9.0}> {
      o1 = Add(x, sw)
      dd = Mul(t, dead_sw)
      de = Add(dd, v)
    },
    else_branch = el () => (float[N, 4] o2) {
      o2 = Mul(x, u)
    }
  >
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["If"]
    bodies = branches(candidate)
    assert graph_ops(bodies["then_branch"]) == ["Add"]
    assert graph_ops(bodies["else_branch"]) == ["Mul"]
    assert list(bodies["then_branch"].initializers) == ["sw"]
    assert list(candidate.graph.initializers) == ["u"]
    assert modified and pass_.matches == 5  # Neg, Mul, Add, dead_sw, v
    assert_parity(model, candidate, if_feeds())
    check(candidate)
    _, again, modified = run(candidate)
    assert not modified and again.matches == 0


def test_dead_if_frees_what_only_its_branches_read():
    # onnx-ir's RemoveUnusedNodesPass removes the If but leaves Neg forever: the removed
    # branches' nodes still count as users of t.
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x, bool c) => (float[N, 4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
  y = Relu(x)
  t = Neg(x)
  d = If(c) <then_branch = th () => (float[N, 4] o1) { o1 = Add(t, w) },
             else_branch = el () => (float[N, 4] o2) { o2 = Identity(t) }>
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["Relu"]
    assert not candidate.graph.initializers
    assert modified and pass_.matches == 3  # If, Neg, w
    assert_parity(model, candidate, if_feeds())
    check(candidate)

    library = model.clone()
    common_passes.RemoveUnusedNodesPass()(library)
    assert op_list(library) == ["Relu", "Neg"]  # the bug this pass exists for


def test_outer_value_read_by_live_subgraph_node_is_kept():
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x, bool c) => (float[N, 4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
  t = Neg(x)
  y = If(c) <then_branch = th () => (float[N, 4] o1) { o1 = Add(t, w) },
             else_branch = el () => (float[N, 4] o2) { o2 = Identity(x) }>
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["Neg", "If"]
    assert list(candidate.graph.initializers) == ["w"]
    assert not modified and pass_.matches == 0
    assert_parity(model, candidate, if_feeds())
    check(candidate)


def test_dead_nodes_in_functions_removed():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[N, 4] x) => (float[N, 4] y) {
  y = local.F(x)
}
<domain: "local", opset_import: ["" : 17]>
F (a) => (b) {
  b = Relu(a)
  dead = Neg(a)
}
""")
    candidate, pass_, modified = run(model)
    function = candidate.functions[("local", "F", "")]
    assert [n.op_type for n in function] == ["Relu"]
    assert op_list(candidate) == ["F"]
    assert modified and pass_.matches == 1
    assert_parity(model, candidate)
    check(candidate)
