"""collapse_chains: Unsqueeze/Squeeze/Transpose/Reshape pairs become one node (exact op list,
combined axes, parity, checker, idempotence), and chains it cannot merge exactly stay."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.cleanup.collapse_chains import CollapseChains, _normalize
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

INITS = """<int64[1] i0 = {0}, int64[1] i1 = {1}, int64[1] im1 = {-1}, int64[1] im4 = {-4},
  int64[2] i03 = {0, 3}, int64[2] s012 = {0, 12}, int64[3] sm143 = {-1, 4, 3},
  int64[3] s043 = {0, 4, 3}>"""


def graph(body: str, x: str, out: str, opset: int = 17, extra: str = "") -> str:
    return f"""<ir_version: 8, opset_import: ["" : {opset}]>
g ({x} x{extra}) => ({out} y) {INITS} {{
  {body}
}}"""


def run(text: str, feeds=None) -> tuple[ir.Model, ir.Model, bool]:
    model = model_from_text(text)
    candidate, result = apply_pass(CollapseChains(), model)
    check(candidate)
    assert_parity(model, candidate, feeds)
    assert not CollapseChains()(candidate.clone()).modified, "second run must find nothing"
    return model, candidate, result.modified


def axes(node: ir.Node) -> list[int]:
    if "axes" in node.attributes:
        return list(node.attributes.get_ints("axes"))
    return node.inputs[1].const_value.numpy().tolist()


UNSQ = "m = Unsqueeze(x, i1)\n  u = Unsqueeze(m, i03)\n  y = Neg(u)"
FIRE = {  # name: (text, op list after, combined axes or perm of the surviving node)
    "bert_arange_opset17": (
        graph("m = Unsqueeze(x, i0)\n  y = Unsqueeze(m, i1)", "int64[S]", "int64[1, 1, S]"),
        ["Unsqueeze"],
        [0, 1],
    ),
    "unsqueeze_opset17": (
        graph(UNSQ, "float[N, 3]", "float[1, N, 1, 1, 3]"),
        ["Unsqueeze", "Neg"],
        [0, 2, 3],
    ),
    "unsqueeze_opset11": (
        graph(
            "m = Unsqueeze<axes = [1]>(x)\n  u = Unsqueeze<axes = [0, 3]>(m)\n  y = Neg(u)",
            "float[N, 3]",
            "float[1, N, 1, 1, 3]",
            opset=11,
        ),
        ["Unsqueeze", "Neg"],
        [0, 2, 3],
    ),
    "unsqueeze_negative_opset17": (
        graph(
            "m = Unsqueeze(x, im1)\n  u = Unsqueeze(m, im4)\n  y = Neg(u)",
            "float[N, 3]",
            "float[1, N, 3, 1]",
        ),
        ["Unsqueeze", "Neg"],
        [0, 3],
    ),
    "unsqueeze_three_opset11": (
        graph(
            "a = Unsqueeze<axes = [-1]>(x)\n  b = Unsqueeze<axes = [0]>(a)\n"
            "  u = Unsqueeze<axes = [2]>(b)\n  y = Neg(u)",
            "float[N]",
            "float[1, N, 1, 1]",
            opset=11,
        ),
        ["Unsqueeze", "Neg"],
        [0, 2, 3],
    ),
    "squeeze_negative_opset11": (
        graph(
            "m = Squeeze<axes = [1]>(x)\n  u = Squeeze<axes = [-1]>(m)\n  y = Neg(u)",
            "float[N, 1, 3, 1]",
            "float[N, 3]",
            opset=11,
        ),
        ["Squeeze", "Neg"],
        [1, 3],
    ),
    "squeeze_opset17": (
        graph(
            "m = Squeeze(x, i0)\n  u = Squeeze(m, i1)\n  y = Neg(u)", "float[1, N, 1]", "float[N]"
        ),
        ["Squeeze", "Neg"],
        [0, 2],
    ),
    "transpose": (
        graph(
            "m = Transpose<perm = [0, 2, 1]>(x)\n  u = Transpose<perm = [1, 0, 2]>(m)\n"
            "  y = Neg(u)",
            "float[N, 3, 4]",
            "float[4, N, 3]",
        ),
        ["Transpose", "Neg"],
        [2, 0, 1],
    ),
    "reshape": (
        graph(
            "m = Reshape(x, s012)\n  u = Reshape(m, sm143)\n  y = Neg(u)",
            "float[N, 3, 4]",
            "float[N, 4, 3]",
        ),
        ["Reshape", "Neg"],
        None,
    ),
}


@pytest.mark.parametrize(("text", "ops", "params"), FIRE.values(), ids=FIRE.keys())
def test_chain_is_collapsed(text, ops, params):
    _, out, modified = run(text)
    assert modified and op_list(out) == ops
    node = out.graph.node(0)
    assert node.inputs[0].name == "x"
    if node.op_type == "Transpose":
        assert list(node.attributes.get_ints("perm")) == params
    elif params is not None:
        assert axes(node) == params
    assert [v.name for v in out.graph.outputs] == ["y"]


def test_identity_transpose_result_is_left_for_remove_noops():
    text = graph(
        "m = Transpose<perm = [1, 0]>(x)\n  y = Transpose<perm = [1, 0]>(m)",
        "float[N, 3]",
        "float[N, 3]",
    )
    _, out, modified = run(text)
    assert modified and op_list(out) == ["Transpose"]
    assert list(out.graph.node(0).attributes.get_ints("perm")) == [0, 1]


KEEP = {
    "first_used_twice": graph(
        "m = Unsqueeze(x, i0)\n  u = Unsqueeze(m, i0)\n  y = Add(u, m)",
        "float[N]",
        "float[1, 1, N]",
    ),
    "first_is_graph_output": graph(
        "m = Unsqueeze(x, i0)\n  y = Unsqueeze(m, i0)", "float[N]", "float[1, 1, N]"
    ).replace("=> (", "=> (float[1, N] m, "),
    "reshape_zero_in_second": graph(
        "m = Reshape(x, s012)\n  y = Reshape(m, s043)", "float[N, 3, 4]", "float[N, 4, 3]"
    ),
    "transpose_first_without_perm": graph(
        "m = Transpose(x)\n  y = Transpose<perm = [1, 0]>(m)", "float[N, 3]", "float[N, 3]"
    ),
    "transpose_second_without_perm": graph(
        "m = Transpose<perm = [1, 0]>(x)\n  y = Transpose(m)", "float[N, 3]", "float[N, 3]"
    ),
    "squeeze_without_axes": graph(
        "m = Squeeze(x, i0)\n  y = Squeeze(m)", "float[1, 1, 3]", "float[3]"
    ),
    "different_ops": graph("m = Unsqueeze(x, i0)\n  y = Squeeze(m, i0)", "float[N]", "float[N]"),
}


@pytest.mark.parametrize("text", KEEP.values(), ids=KEEP.keys())
def test_near_miss_is_kept(text):
    model, out, modified = run(text)
    assert not modified and op_list(out) == op_list(model)


NON_CONSTANT = {  # the second node's axes / shape is a graph input: not a constant
    "unsqueeze_axes": ("m = Unsqueeze(x, i0)\n  y = Unsqueeze(m, k)", "float[?, ?, ?]", [0]),
    "reshape_shape": ("m = Reshape(x, s012)\n  y = Reshape(m, k)", "float[?, ?]", [4, 6]),
}


@pytest.mark.parametrize(("body", "out", "k"), NON_CONSTANT.values(), ids=NON_CONSTANT.keys())
def test_non_constant_second_parameter_is_kept(body, out, k):
    text = graph(body, "float[2, 3, 4]", out, extra=f", int64[{len(k)}] k")
    feeds = [{"x": np.ones((2, 3, 4), np.float32), "k": np.array(k)}]
    model, candidate, modified = run(text, feeds)
    assert not modified and op_list(candidate) == op_list(model)


@pytest.mark.parametrize(("second", "fires"), [("i0", True), ("im1", False)])
def test_unknown_rank_needs_non_negative_axes(second, fires):
    # x = Reshape(v, k) with k of unknown length: shape inference cannot tell x's rank.
    body = f"x = Reshape(v, k)\n  m = Unsqueeze(x, i1)\n  y = Unsqueeze(m, {second})"
    text = graph(body, "float[N]", "float[?, ?, 1]", extra=", int64[M] k")
    text = text.replace("float[N] x", "float[N] v")
    feeds = [{"v": np.arange(n, dtype=np.float32), "k": np.array([n])} for n in (2, 3)]
    model, out, modified = run(text, feeds)
    assert modified == fires
    assert op_list(out) == (["Reshape", "Unsqueeze"] if fires else op_list(model))
    if fires:
        assert axes(out.graph.node(1)) == [0, 2]


def test_out_of_range_axes_are_rejected():
    assert _normalize([-1, 2], 3) is None  # the same axis twice
    assert _normalize([-1, 1], 3) == [2, 1]
    assert _normalize([3], 3) is None and _normalize([-4], 3) is None
    assert _normalize([-1], None) is None and _normalize([1, 1], None) is None


def test_reshape_allowzero_second_collapses():
    text = graph(
        "m = Reshape(x, s012)\n  y = Reshape<allowzero = 1>(m, s043)",
        "float[N, 3, 4]",
        "float[0, 4, 3]",
        opset=18,
    )
    _, out, modified = run(text, [{"x": np.ones((0, 3, 4), np.float32)}])
    assert modified and op_list(out) == ["Reshape"]


def test_chain_inside_if_branch():
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
g (bool c, float[N] x) => (float[1, 1, N] y) <int64[1] i0 = {0}, int64[2] i01 = {0, 1}> {
  y = If(c) <
    then_branch = t () => (float[1, 1, N] r) { m = Unsqueeze(x, i0)
                                               r = Unsqueeze(m, i0) },
    else_branch = e () => (float[1, 1, N] r2) { m2 = Unsqueeze(x, i01)
                                                r2 = Identity(m2) }
  >
}""")
    out, result = apply_pass(CollapseChains(), model)
    assert result.modified
    then = out.graph.node(0).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then] == ["Unsqueeze"]
    assert axes(then.node(0)) == [0, 1] and then.node(0).inputs[0].name == "x"
    check(out)
    feeds = [
        {"c": np.array(flag), "x": np.arange(n, dtype=np.float32)}
        for flag, n in ((True, 2), (False, 3), (True, 3))
    ]
    assert_parity(model, out, feeds)
    assert not CollapseChains()(out.clone()).modified


def test_chain_across_graphs_is_kept():
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
g (bool c, float[N] x) => (float[1, 1, N] y) <int64[1] i0 = {0}, int64[2] i01 = {0, 1}> {
  m = Unsqueeze(x, i0)
  y = If(c) <
    then_branch = t () => (float[1, 1, N] r) { r = Unsqueeze(m, i0) },
    else_branch = e () => (float[1, 1, N] r2) { r2 = Unsqueeze(x, i01) }
  >
}""")
    out, result = apply_pass(CollapseChains(), model)
    assert not result.modified and op_list(out) == ["Unsqueeze", "If"]
    check(out)
