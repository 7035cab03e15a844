"""MergeDuplicateInitializers: equal dtype + shape + bytes merge within a graph; graph
inputs, graph outputs, other graphs and merely equal values (0.0 vs -0.0) are respected."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graph_passes.cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressions
from graph_passes.cleanup.merge_duplicate_initializers import MergeDuplicateInitializers
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def graph_ops(graph: ir.Graph) -> list[str]:
    graph.sort()
    return [node.op_type for node in graph]


def run(model: ir.Model) -> tuple[ir.Model, MergeDuplicateInitializers, bool]:
    pass_ = MergeDuplicateInitializers()
    candidate, result = apply_pass(pass_, model)
    return candidate, pass_, result.modified


TIED = (
    HEADER
    + """
g (float[N, 4] x) => (float[N, 4] y)
  <float[4] w1 = {1.0, 2.0, 3.0, 4.0}, float[4] w2 = {1.0, 2.0, 3.0, 4.0},
   float[4] w3 = {1.0, 2.0, 3.0, 4.0}, float[4] other = {1.0, 2.0, 3.0, 5.0}> {
  a = Mul(x, w1)
  b = Mul(x, w2)
  c = Mul(x, w3)
  d = Mul(x, other)
  s = Sum(a, b, c)
  y = Add(s, d)
}
"""
)


def test_equal_weights_merge_then_cse_merges_the_nodes():
    model = model_from_text(TIED)
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["Mul", "Mul", "Mul", "Mul", "Sum", "Add"]
    assert sorted(candidate.graph.initializers) == ["other", "w1"]
    assert modified and pass_.matches == 2
    assert_parity(model, candidate)
    check(candidate)

    EliminateCommonSubexpressions()(candidate)
    assert op_list(candidate) == ["Mul", "Mul", "Sum", "Add"]
    assert_parity(model, candidate)
    check(candidate)


def test_idempotent():
    once, _, _ = run(model_from_text(TIED))
    twice, pass_, modified = run(once)
    assert not modified and pass_.matches == 0
    assert sorted(twice.graph.initializers) == ["other", "w1"]


def test_equal_bytes_with_other_shape_or_dtype_or_equal_values_do_not_merge():
    # Same bytes as float[4] but float[2, 2]; the bits of 2.0f as int32; and 0.0 vs -0.0,
    # which compare equal as numbers but are different bytes (1/0 vs 1/-0).
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x) => (float[N, 4] y, float[2, 2] z, int32[1] i, float[1] r)
  <float[4] a = {1.0, 2.0, 3.0, 4.0}, float[2, 2] b = {1.0, 2.0, 3.0, 4.0},
   float[1] f = {2.0}, int32[1] n = {1073741824},
   float[1] pz = {0.0}, float[1] nz = {-0.0}, float[1] one = {1.0}> {
  y = Mul(x, a)
  z = Identity(b)
  t = Cast<to = 6>(f)
  i = Add(t, n)
  p = Div(one, pz)
  q = Div(one, nz)
  r = Sub(p, q)
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == op_list(model.clone())
    assert not modified and pass_.matches == 0
    assert len(candidate.graph.initializers) == 7
    assert_parity(model, candidate)
    check(candidate)


def test_initializer_that_is_a_graph_input_is_not_merged():
    # w2 is an input with a default: a caller may feed another value.
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x, float[4] w2) => (float[N, 4] y)
  <float[4] w1 = {1.0, 2.0, 3.0, 4.0}, float[4] w2 = {1.0, 2.0, 3.0, 4.0}> {
  a = Mul(x, w1)
  b = Mul(x, w2)
  y = Add(a, b)
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["Mul", "Mul", "Add"]
    assert sorted(candidate.graph.initializers) == ["w1", "w2"]
    assert not modified and pass_.matches == 0
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    feeds = [{"x": x}, {"x": x, "w2": np.array([-1, 0, 5, 7], np.float32)}]
    assert_parity(model, candidate, feeds)
    check(candidate)


def test_graph_output_initializer_survives_and_absorbs_its_duplicate():
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x) => (float[N, 4] y, float[4] w2)
  <float[4] w1 = {1.0, 2.0, 3.0, 4.0}, float[4] w2 = {1.0, 2.0, 3.0, 4.0}> {
  y = Mul(x, w1)
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["Mul"]
    assert list(candidate.graph.initializers) == ["w2"]
    assert [v.name for v in candidate.graph.outputs] == ["y", "w2"]
    assert candidate.graph.node(0).inputs[1] is candidate.graph.initializers["w2"]
    assert modified and pass_.matches == 1
    assert_parity(model, candidate)
    check(candidate)


def test_subgraph_initializers_merge_within_their_graph_only():
    model = model_from_text(
        HEADER
        + """
g (float[N, 4] x, bool c) => (float[N, 4] y) <float[4] m = {1.0, 2.0, 3.0, 4.0}> {
  y = If(c) <
    then_branch = th () => (float[N, 4] o1)
      <float[4] s1 = {1.0, 2.0, 3.0, 4.0}, float[4] s2 = {1.0, 2.0, 3.0, 4.0}> {
      a = Mul(x, s1)
      b = Mul(x, s2)
      o1 = Add(a, b)
    },
    else_branch = el () => (float[N, 4] o2) {
      o2 = Mul(x, m)
    }
  >
}
"""
    )
    candidate, pass_, modified = run(model)
    assert op_list(candidate) == ["If"]
    then = candidate.graph.node(0).attributes["then_branch"].as_graph()
    assert graph_ops(then) == ["Mul", "Mul", "Add"]
    assert list(then.initializers) == ["s1"]
    assert list(candidate.graph.initializers) == ["m"]  # not merged across graphs
    assert modified and pass_.matches == 1
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    assert_parity(model, candidate, [{"x": x, "c": np.array(f)} for f in (True, False)])
    check(candidate)


def test_string_initializers():
    # Equal on strings needs opset 19 in ONNX Runtime.
    model = model_from_text(
        '<ir_version: 9, opset_import: ["" : 19]>'
        + """
g (string[N] x) => (bool[N] y, bool[N] z, bool[N] u)
  <string[2] a = {"a", "b"}, string[2] b = {"a", "b"}, string[2] c = {"ab", ""}> {
  k = Constant<value = int64 {1}>()
  a1 = Gather(a, k)
  b1 = Gather(b, k)
  c1 = Gather(c, k)
  y = Equal(x, a1)
  z = Equal(x, b1)
  u = Equal(x, c1)
}
"""
    )
    candidate, pass_, _ = run(model)
    assert sorted(candidate.graph.initializers) == ["a", "c"]  # "ab","" is not "a","b"
    assert pass_.matches == 1
    assert op_list(candidate) == op_list(model.clone())
    assert_parity(model, candidate)
    check(candidate)
