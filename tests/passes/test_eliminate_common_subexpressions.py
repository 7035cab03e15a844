"""EliminateCommonSubexpressions: merges identical deterministic nodes in every graph, chains
at once, and never merges random ops, different attributes, or nodes of different graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressions
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def graph_ops(graph: ir.Graph) -> list[str]:
    graph.sort()
    return [node.op_type for node in graph]


def branches(model: ir.Model, op_type: str = "If") -> dict[str, ir.Graph]:
    node = next(n for n in model.graph if n.op_type == op_type)
    return {name: attr.as_graph() for name, attr in node.attributes.items()}


def run(model: ir.Model) -> tuple[ir.Model, EliminateCommonSubexpressions, bool]:
    pass_ = EliminateCommonSubexpressions()
    candidate, result = apply_pass(pass_, model)
    return candidate, pass_, result.modified


def test_duplicate_chain_collapses_in_one_call():
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x) => (float[N, 4] y) {
  a1 = Relu(x)
  a2 = Relu(x)
  b1 = Sigmoid(a1)
  b2 = Sigmoid(a2)
  c1 = Transpose<perm = [1, 0]>(b1)
  c2 = Transpose<perm = [1, 0]>(b2)
  d = Add(c1, c2)
  y = Transpose<perm = [1, 0]>(d)
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["Relu", "Sigmoid", "Transpose", "Add", "Transpose"]
    assert modified and pass_.matches == 3
    add = next(n for n in candidate.graph if n.op_type == "Add")
    assert add.inputs[0] is add.inputs[1]
    assert_parity(model, candidate)
    check(candidate)


def test_idempotent():
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x) => (float[N, 4] y) {
  a1 = Abs(x)
  a2 = Abs(x)
  y = Mul(a1, a2)
}
"""
    )
    once, first, _ = run(model)
    twice, second, modified = run(once)
    assert first.matches == 1
    assert not modified and second.matches == 0
    assert op_list(twice) == ["Abs", "Mul"]
    assert_parity(model, twice)
    check(twice)


def test_different_attributes_or_inputs_do_not_merge():
    # Every pair differs in one thing: an attribute value, an input, the sign of a zero
    # (0.0 == -0.0 in Python, yet 1/0 and 1/-0 differ), or the shape of equal bytes.
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x, float[N, 4] z) => (float[N, 4] y, float[N, 4] w, float[4] v, float[1, 4] u) {
  l1 = LeakyRelu<alpha = 0.1>(x)
  l2 = LeakyRelu<alpha = 0.2>(x)
  r1 = Relu(x)
  r2 = Relu(z)
  s1 = Add(l1, l2)
  s2 = Add(r1, r2)
  y = Add(s1, s2)
  p = Constant<value_float = 0.0>()
  n = Constant<value_float = -0.0>()
  one = Constant<value_float = 1.0>()
  ip = Div(one, p)
  in = Div(one, n)
  ipn = Add(ip, in)
  w = Add(x, ipn)
  c1 = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
  c2 = Constant<value = float[1, 4] {1.0, 2.0, 3.0, 4.0}>()
  v = Identity(c1)
  u = Identity(c2)
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == op_list(model.clone())
    assert not modified and pass_.matches == 0
    assert_parity(model, candidate)
    check(candidate)


def test_equal_small_constants_merge_and_big_ones_do_not():
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x) => (float[N, 4] y) {
  c1 = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
  c2 = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
  a = Add(x, c1)
  b = Add(x, c2)
  y = Mul(a, b)
}
"""
    )
    candidate, pass_, _ = run(model)
    assert op_list(candidate) == ["Constant", "Add", "Mul"]
    assert pass_.matches == 2
    assert_parity(model, candidate)
    check(candidate)

    big = model_from_text(
        HEADER
        + """
g (float[N, 2000] x) => (float[N, 2000] y) {
  c1 = Constant<value = float[1] {0.0}>()
  c2 = Constant<value = float[1] {0.0}>()
  a = Add(x, c1)
  b = Add(x, c2)
  y = Mul(a, b)
}
"""
    )
    data = np.linspace(-1, 1, 2000, dtype=np.float32)
    for node in big.graph:
        if node.op_type == "Constant":
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(data))
    candidate, pass_, modified = run(big)
    assert op_list(candidate) == ["Constant", "Constant", "Add", "Add", "Mul"]
    assert not modified and pass_.matches == 0
    assert_parity(big, candidate)
    check(candidate)


def test_random_ops_do_not_merge():
    # The deterministic Relu pair merges; the random pairs (and dropout in training mode,
    # which draws a random mask) must stay. Random values cannot be compared, so the outputs
    # that depend on them are shapes.
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x) => (float[N, 4] y, int64[2] s1, int64[2] s2, int64[2] s3) {
  a1 = Relu(x)
  a2 = Relu(x)
  y = Add(a1, a2)
  n1 = RandomNormalLike(x)
  n2 = RandomNormalLike(x)
  d1 = Sub(n1, n2)
  s1 = Shape(d1)
  u1 = RandomUniformLike<seed = 1.0>(x)
  u2 = RandomUniformLike<seed = 1.0>(x)
  b1 = Bernoulli(u1)
  b2 = Bernoulli(u1)
  d2 = Sub(b1, b2)
  e = Sub(u1, u2)
  f = Add(d2, e)
  s2 = Shape(f)
  ratio = Constant<value_float = 0.5>()
  train = Constant<value = bool {1}>()
  o1 = Dropout(x, ratio, train)
  o2 = Dropout(x, ratio, train)
  d3 = Sub(o1, o2)
  s3 = Shape(d3)
}
"""
    )
    candidate, pass_, _ = run(model)
    ops = op_list(candidate)
    assert ops.count("Relu") == 1 and pass_.matches == 1
    for op in ("RandomNormalLike", "RandomUniformLike", "Bernoulli", "Dropout"):
        assert ops.count(op) == 2, op
    assert len(ops) == len(op_list(model.clone())) - 1
    assert_parity(model, candidate)
    check(candidate)


def test_duplicate_graph_output_takes_its_name():
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x) => (float[N, 4] y, float[N, 4] z) {
  a = Abs(x)
  z = Abs(x)
  y = Mul(a, a)
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["Abs", "Mul"]
    assert modified and pass_.matches == 1
    assert [v.name for v in candidate.graph.outputs] == ["y", "z"]
    z = candidate.graph.outputs[1]
    assert z.producer().op_type == "Abs"
    assert z.dtype == ir.DataType.FLOAT and [str(d) for d in z.shape] == ["N", "4"]
    mul = candidate.graph.outputs[0].producer()
    assert mul.inputs[0] is z and mul.inputs[1] is z
    assert_parity(model, candidate)
    check(candidate)


def test_duplicate_of_a_graph_output_stays():
    # Both values are graph outputs: merging would need an Identity or a rename; neither.
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x) => (float[N, 4] y, float[N, 4] z) {
  a = Relu(x)
  y = Neg(a)
  z = Neg(a)
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["Relu", "Neg", "Neg"]
    assert not modified and pass_.matches == 0
    assert [v.name for v in candidate.graph.outputs] == ["y", "z"]
    assert_parity(model, candidate)
    check(candidate)


SUBGRAPH = (
    HEADER
    + """
g (float[N, 4] x, bool c) => (float[N, 4] y) {
  a = Relu(x)
  b = Relu(x)
  y = If(c) <
    then_branch = t (
    ) => (float[N, 4] t_out) {
      t1 = Neg(a)
      t2 = Neg(b)
      t3 = Relu(x)
      t4 = Add(t1, t2)
      t_out = Add(t4, t3)
    },
    else_branch = e () => (float[N, 4] e_out) {
      e1 = Neg(a)
      e_out = Sigmoid(e1)
    }
  >
}
"""
)


def test_subgraphs_merge_inside_but_not_across_graphs():
    model = model_from_text(SUBGRAPH)
    candidate, pass_, _ = run(model)
    assert op_list(candidate) == ["Relu", "If"]
    bodies = branches(candidate)
    # Neg(a) and Neg(b) merge once a and b are one value; the branch's Relu(x) stays,
    # and so does the else branch's Neg(a) (another graph).
    assert graph_ops(bodies["then_branch"]) == ["Neg", "Relu", "Add", "Add"]
    assert graph_ops(bodies["else_branch"]) == ["Neg", "Sigmoid"]
    assert pass_.matches == 2
    feeds = [
        {"x": np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4), "c": np.array(flag)}
        for flag in (True, False)
    ]
    assert_parity(model, candidate, feeds)
    check(candidate)
    again, second, modified = run(candidate)
    assert not modified and second.matches == 0


def test_nodes_owning_subgraphs_do_not_merge():
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x, bool c) => (float[N, 4] y) {
  i1 = If(c) <then_branch = t1 () => (float[N, 4] o1) { o1 = Neg(x) },
              else_branch = e1 () => (float[N, 4] p1) { p1 = Abs(x) }>
  i2 = If(c) <then_branch = t2 () => (float[N, 4] o2) { o2 = Neg(x) },
              else_branch = e2 () => (float[N, 4] p2) { p2 = Abs(x) }>
  y = Add(i1, i2)
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["If", "If", "Add"]
    assert not modified and pass_.matches == 0
    feeds = [{"x": np.ones((2, 4), np.float32), "c": np.array(flag)} for flag in (True, False)]
    assert_parity(model, candidate, feeds)
    check(candidate)
