"""remove_noops: every kind of no-op goes (exact op list, parity, checker), and near misses
that change values, shapes, types or the graph signature stay."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.cleanup.remove_noops import RemoveNoops
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

X = "float[N, 3, 4]"
INITS = """<float one = {1.0}, float zero = {0.0}, float two = {2.0}, float ratio = {0.5},
  float[3, 4] zeros34 = {0,0,0,0,0,0,0,0,0,0,0,0}, float[1, 1, 4] ones114 = {1, 1, 1, 1},
  int64 izero = {0}, bool no = {0}, bool yes = {1}, int64[6] pads0 = {0,0,0,0,0,0},
  int64[6] pads1 = {0,0,0,0,0,1}, float five = {5.0}, int64[3] s234 = {2, 3, 4},
  int64[3] s324 = {3, 2, 4},
  int64[3] s2m14 = {2, -1, 4}, int64[3] s034 = {0, 3, 4}, int64[3] sm134 = {-1, 3, 4},
  int64[2] sm14 = {-1, 4}, int64[1] z1 = {0}, int64[1] big = {9223372036854775807},
  int64[2] z2 = {0, 0}, int64[2] e2 = {2, 100}, int64[2] ax = {0, -1}, int64[1] e2_1 = {2},
  int64[1] e100 = {100}, int64[1] ax1 = {1}, int64[2] o11 = {1, 1}, int64[3] o111 = {1, 1, 1},
  int64[4] grow = {2, 1, 1, 1}, double dzero = {0.0}>"""


def graph(body: str, x: str = X, out: str | None = None, extra: str = "") -> str:
    return f"""<ir_version: 9, opset_import: ["" : 18]>
g ({x} x{extra}) => ({out or x} y) {INITS} {{
  {body}
  y = Neg(a)
}}"""


def run(text: str) -> tuple[ir.Model, ir.Model, bool]:
    model = model_from_text(text)
    candidate, result = apply_pass(RemoveNoops(), model)
    check(candidate)
    assert_parity(model, candidate)
    assert not RemoveNoops()(candidate.clone()).modified, "second run must find nothing"
    return model, candidate, result.modified


NOOPS = {
    "identity": graph("a = Identity(x)"),
    "dropout": graph("a = Dropout(x, ratio)"),
    "dropout_false": graph("a = Dropout(x, ratio, no)"),
    "dropout_unused_mask": graph("a, mask = Dropout(x)"),
    "cast_same": graph("a = Cast<to = 1>(x)"),
    "castlike_same": graph("a = CastLike(x, one)"),
    "reshape_static": graph("a = Reshape(x, s234)", x="float[2, 3, 4]"),
    "reshape_minus_one": graph("a = Reshape(x, s2m14)", x="float[2, 3, 4]"),
    "reshape_allowzero": graph("a = Reshape<allowzero = 1>(x, s234)", x="float[2, 3, 4]"),
    "reshape_copy_dynamic": graph("a = Reshape(x, s034)"),
    "reshape_infer_dynamic": graph("a = Reshape(x, sm134)"),
    "transpose_identity": graph("a = Transpose<perm = [0, 1, 2]>(x)"),
    "transpose_rank1": graph("a = Transpose(x)", x="float[N]"),
    "pad_zero": graph("a = Pad(x, pads0)"),
    "pad_zero_value": graph("a = Pad(x, pads0, five)"),
    "slice_huge_end": graph("a = Slice(x, z1, big)"),
    "slice_static_ends": graph("a = Slice(x, z2, e2, ax)", x="float[2, N, 4]"),
    "expand_ones": graph("a = Expand(x, o11)"),
    "tile_ones": graph("a = Tile(x, o111)"),
    "mul_one": graph("a = Mul(x, one)"),
    "one_mul": graph("a = Mul(one, x)"),
    "add_zeros_same_shape": graph("a = Add(x, zeros34)"),
    "zero_add": graph("a = Add(zero, x)"),
    "sub_zero": graph("a = Sub(x, zero)"),
    "div_ones_broadcast_ones": graph("a = Div(x, ones114)"),
    "int_add_zero": graph("a = Add(x, izero)", x="int64[N, 3]"),
}


@pytest.mark.parametrize("text", NOOPS.values(), ids=NOOPS.keys())
def test_noop_is_removed(text):
    _, out, modified = run(text)
    assert modified
    assert op_list(out) == ["Neg"]
    assert out.graph.node(0).inputs[0].name == "x"


KEEP = {
    "cast_other_type": graph("a = Cast<to = 11>(x)", out="double[N, 3, 4]"),
    "reshape_other_shape": graph("a = Reshape(x, sm14)", out="float[M, 4]"),
    "reshape_same_rank_other_shape": graph(
        "a = Reshape(x, s324)", x="float[2, 3, 4]", out="float[3, 2, 4]"
    ),
    "transpose_perm": graph("a = Transpose<perm = [0, 2, 1]>(x)", out="float[N, 4, 3]"),
    "transpose_no_perm_rank3": graph("a = Transpose(x)", out="float[4, 3, N]"),
    "pad_nonzero": graph("a = Pad(x, pads1)", out="float[N, 3, 5]"),
    "slice_partial": graph("a = Slice(x, z1, e2_1, ax1)", out="float[N, 2, 4]"),
    "slice_dynamic_dim_small_end": graph("a = Slice(x, z1, e100)"),
    "mul_two": graph("a = Mul(x, two)"),
    "add_zeros_that_grow_x": graph("a = Add(x, zeros34)", x="float[4]", out="float[3, 4]"),
    "add_zeros_that_grow_a_1_dim": graph("a = Add(x, zeros34)", x="float[1, 4]", out="float[3, 4]"),
    "expand_that_grows": graph("a = Expand(x, grow)", out="float[2, N, 3, 4]"),
    "zero_sub": graph("a = Sub(zero, x)"),
    # ratio 0 keeps training-mode Dropout deterministic, so parity still holds
    "dropout_training": graph("a = Dropout(x, zero, yes)"),
    "dropout_used_mask": graph("a0, mask = Dropout(x)\n  m = Cast<to = 1>(mask)\n  a = Add(a0, m)"),
}


@pytest.mark.parametrize("text", KEEP.values(), ids=KEEP.keys())
def test_near_miss_is_kept(text):
    model, out, modified = run(text)
    assert not modified
    assert op_list(out) == op_list(model)


def test_dropout_with_a_training_mode_input_stays():
    model = model_from_text(graph("a = Dropout(x, zero, t)", extra=", bool t"))
    out, result = apply_pass(RemoveNoops(), model)
    assert not result.modified and op_list(out) == ["Dropout", "Neg"]
    # Explicit feeds: the generator gives scalar bool inputs as numpy.bool_, not arrays.
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert_parity(model, out, [{"x": x, "t": np.array(flag)} for flag in (True, False)])


def test_mul_by_ones_that_broadcast_x_to_a_bigger_shape_stays():
    text = graph("a = Mul(x, ones23)", x="float[3]", out="float[2, 3]").replace(
        "<float one", "<float[2, 3] ones23 = {1, 1, 1, 1, 1, 1}, float one"
    )
    model, out, modified = run(text)
    assert not modified and op_list(out) == ["Mul", "Neg"]


def test_one_that_is_also_a_graph_input_is_not_a_constant():
    text = graph("a = Mul(x, one)", extra=", float one")
    model, out, modified = run(text)
    assert not modified and op_list(out) == ["Mul", "Neg"]


def test_identity_from_graph_input_to_graph_output_stays():
    model, out, modified = run("""<ir_version: 9, opset_import: ["" : 18]>
g (float[N] x) => (float[N] y) { y = Identity(x) }""")
    assert not modified and op_list(out) == ["Identity"]


def test_noop_producing_a_graph_output_hands_over_the_name():
    model, out, modified = run("""<ir_version: 9, opset_import: ["" : 18]>
g (float[N, 3] x) => (float[N, 3] y) <float one = {1.0}> {
  r = Relu(x)
  i = Identity(r)
  y = Mul(i, one)
}""")
    assert modified and op_list(out) == ["Relu"]
    (output,) = out.graph.outputs
    assert output.name == "y" and output.producer().op_type == "Relu"
    assert list(output.shape) == [ir.SymbolicDim("N"), 3]


def test_identity_inside_if_branch():
    model = model_from_text("""<ir_version: 9, opset_import: ["" : 18]>
g (bool c, float[N, 3] x) => (float[N, 3] y) {
  y = If(c) <
    then_branch = then () => (float[N, 3] r) { i = Identity(x)
                                               r = Neg(i) },
    else_branch = other () => (float[N, 3] r2) { r2 = Identity(x) }
  >
}""")
    out, result = apply_pass(RemoveNoops(), model)
    assert result.modified
    branches = out.graph.node(0).attributes
    assert [n.op_type for n in branches["then_branch"].as_graph()] == ["Neg"]
    # Outer x cannot become the else branch's output by renaming: that Identity stays.
    assert [n.op_type for n in branches["else_branch"].as_graph()] == ["Identity"]
    check(out)
    feeds = [
        {"c": np.array(flag), "x": np.ones((n, 3), np.float32)}
        for flag, n in ((True, 2), (False, 3))
    ]
    assert_parity(model, out, feeds)
    assert not RemoveNoops()(out.clone()).modified
