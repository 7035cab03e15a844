"""LiftConstants: Constant nodes become initializers in every graph; graph-output Constants
and IR < 4 models are left alone."""

from __future__ import annotations

import numpy as np

from graph_passes.cleanup.lift_constants import LiftConstants
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
  c = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
  k = Constant<value_float = 2.0>()
  a = Add(x, c)
  y = Mul(a, k)
}
"""


def test_constants_become_initializers():
    model = model_from_text(MODEL)
    pass_ = LiftConstants()
    candidate, result = apply_pass(pass_, model)
    assert op_list(candidate) == ["Add", "Mul"]
    assert sorted(candidate.graph.initializers) == ["c", "k"]
    np.testing.assert_array_equal(
        candidate.graph.initializers["c"].const_value.numpy(), [1.0, 2.0, 3.0, 4.0]
    )
    assert result.modified and pass_.matches == 2
    assert_parity(model, candidate)
    check(candidate)
    again, second = apply_pass(LiftConstants(), candidate)
    assert not second.modified and op_list(again) == ["Add", "Mul"]


def test_constant_inside_if_branch_stays_in_its_branch():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (bool c, float[2] x) => (float[2] y) {
  y = If(c) <
    then_branch = t () => (float[2] o) {
      k = Constant<value = float[2] {1.0, 2.0}>()
      o = Add(x, k)
    },
    else_branch = e () => (float[2] o2) { o2 = Neg(x) }
  >
}
""")
    candidate, result = apply_pass(LiftConstants(), model)
    then_graph = candidate.graph.node(0).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then_graph] == ["Add"]
    assert list(then_graph.initializers) == ["k"]
    assert not candidate.graph.initializers
    feeds = [{"c": np.array(flag), "x": np.array([3.0, 4.0], np.float32)} for flag in (1, 0)]
    assert_parity(model, candidate, [{**f, "c": f["c"].astype(bool)} for f in feeds])
    check(candidate)


def test_must_not_fire_on_graph_output_constant_or_ir3():
    output = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y, float[2] c) {
  c = Constant<value = float[2] {1.0, 2.0}>()
  y = Add(x, c)
}
""")
    candidate, result = apply_pass(LiftConstants(), output)
    assert not result.modified and op_list(candidate) == ["Constant", "Add"]
    old = model_from_text(MODEL)
    old.ir_version = 3
    candidate, result = apply_pass(LiftConstants(), old)
    assert not result.modified and op_list(candidate) == ["Constant", "Constant", "Add", "Mul"]
