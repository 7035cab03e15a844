"""fold_shapes: static Shape/Size (and Shape->Gather/Slice of static dims) become constants;
named dynamic dimensions never do, which the two-size generated inputs would catch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.cleanup.fold_shapes import FoldShapes
from graph_passes.testing.helpers import (
    apply_pass,
    assert_parity,
    check,
    dynamo_sizes,
    model_from_text,
    op_list,
)

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def run(text: str) -> tuple[ir.Model, ir.Model, bool]:
    model = model_from_text(HEADER + text)
    candidate, result = apply_pass(FoldShapes(), model)
    check(candidate)
    assert_parity(model, candidate)
    again = FoldShapes()(candidate.clone())
    assert not again.modified, "second run must find nothing"
    return model, candidate, result.modified


def folded(graph: ir.Graph) -> dict[str, list]:
    """The values of the initializers the pass created."""
    return {
        name: v.const_value.numpy().tolist()
        for name, v in graph.initializers.items()
        if name.endswith("_folded") or "_folded_" in name
    }


def test_static_shape_folds():
    _, out, modified = run("""
g (float[2, 3, 4] x, float[24] z) => (float[2, 3, 4] y) {
  s = Shape(x)
  y = Reshape(z, s)
}""")
    assert modified
    assert op_list(out) == ["Reshape"]
    assert folded(out.graph) == {"s_folded": [2, 3, 4]}


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [("<start = 1>", [3, 4]), ("<start = -2>", [3, 4]), ("<start = 1, end = -1>", [3])],
)
def test_shape_start_end_skips_dynamic_leading_dim(attrs, expected):
    dims = ", ".join(str(d) for d in expected)
    _, out, modified = run(f"""
g (float[N, 3, 4] x) => (float[N, {dims}] y) <int64[1] lead = {{-1}}> {{
  s = Shape {attrs} (x)
  t = Concat<axis = 0>(lead, s)
  y = Reshape(x, t)
}}""")
    assert modified
    assert op_list(out) == ["Concat", "Reshape"]
    assert folded(out.graph) == {"s_folded": expected}


@pytest.mark.parametrize(
    "body",
    [
        "s = Shape(x)\n  y = Reshape(x, s)",
        "s = Shape<end = 1>(x)\n  t = Concat<axis = 0>(s, rest)\n  y = Reshape(x, t)",
        "s = Shape<start = -3, end = 2>(x)\n  t = Concat<axis = 0>(s, tail)\n  y = Reshape(x, t)",
    ],
)
def test_named_dynamic_dims_stay_dynamic(body):
    text = f"""
g (float[N, 3, 4] x) => (float[N, 3, 4] y) <int64[2] rest = {{3, 4}}, int64[1] tail = {{4}}> {{
  {body}
}}"""
    model, out, modified = run(text)
    assert not modified
    assert op_list(out) == op_list(model)
    assert folded(out.graph) == {}


@pytest.mark.parametrize(
    ("pick", "expected"),
    [
        ("d = Gather<axis = 0>(s, two)", [4]),
        ("d = Gather<axis = 0>(s, minus_one)", [4]),
        ("d = Gather<axis = 0>(s, one_two)", [3, 4]),
        ("d = Slice(s, one, big)", [3, 4]),
        ("d = Slice(s, minus_one, zero, zero, minus_one)", [4, 3]),
    ],
)
def test_gather_or_slice_of_static_dims_on_partly_dynamic_tensor(pick, expected):
    _, out, modified = run(f"""
g (float[N, 3, 4] x) => (float[M, 3, 4] y)
  <int64[1] two = {{2}}, int64[1] minus_one = {{-1}}, int64[2] one_two = {{1, 2}},
   int64[1] one = {{1}}, int64[1] big = {{9223372036854775807}}, int64[1] zero = {{0}},
   int64[3] back = {{-1, 3, 4}}> {{
  s = Shape(x)
  {pick}
  t = Concat<axis = 0>(minus_one, d)
  r = Reshape(x, t)
  y = Reshape(r, back)
}}""")
    assert modified
    assert op_list(out) == ["Concat", "Reshape", "Reshape"]
    assert folded(out.graph) == {"d_folded": expected}


@pytest.mark.parametrize(
    "pick", ["d = Gather<axis = 0>(s, zero)", "d = Slice(s, zero, one)", "d = Gather(s, i)"]
)
def test_gather_or_slice_touching_a_dynamic_dim_does_not_fold(pick):
    model, out, modified = run(f"""
g (float[N, 3] x, int64[1] idx) => (int64[2] t)
  <int64[1] zero = {{0}}, int64[1] one = {{1}}, int64[1] two = {{2}}, int64[1] three = {{3}}> {{
  i = Mod(idx, two)
  s = Shape(x)
  {pick}
  t = Concat<axis = 0>(d, three)
}}""")
    assert not modified
    assert op_list(out) == op_list(model)


def test_size_of_static_folds_and_dynamic_does_not():
    _, out, modified = run("""
g (float[2, 3] x, float[N, 3] z) => (int64 y, int64 w) <int64 one = {1}> {
  n = Size(x)
  y = Add(n, one)
  m = Size(z)
  w = Add(m, one)
}""")
    assert modified
    assert op_list(out) == ["Add", "Size", "Add"]
    assert folded(out.graph) == {"n_folded": 6}


def test_shape_in_if_branch_folds_into_a_subgraph_initializer():
    model = model_from_text(
        HEADER
        + """
g (bool c, float[2, 3] x, float[6] z) => (float[2, 3] y) {
  y = If(c) <
    then_branch = then () => (float[2, 3] r) { s = Shape(x)
                                               r = Reshape(z, s) },
    else_branch = other () => (float[2, 3] r2) { r2 = Identity(x) }
  >
}"""
    )
    out, result = apply_pass(FoldShapes(), model)
    assert result.modified
    branch = out.graph.node(0).attributes["then_branch"].as_graph()
    assert [n.op_type for n in branch] == ["Reshape"]
    assert folded(branch) == {"s_folded": [2, 3]}
    check(out)
    feeds = [
        {"c": np.array(flag), "x": np.ones((2, 3), np.float32), "z": np.arange(6, dtype=np.float32)}
        for flag in (True, False)
    ]
    assert_parity(model, out, feeds)


def test_loop_carried_value_keeps_its_dynamic_dim():
    _, out, modified = run("""
g (float[2, 3] x, int64 n) => (float[K, 3] y, int64[T, 1] s) {
  cond = Constant<value = bool {1}>()
  y, s = Loop(n, cond, x) <body = body (int64 i, bool c, float[?, 3] acc)
      => (bool co, float[?, 3] acc2, int64[1] sh) <int64[1] zero = {0}, int64[1] one = {1}> {
    co = Identity(c)
    acc2 = Concat<axis = 0>(acc, acc)
    full = Shape(acc)
    sh = Slice(full, zero, one)
  }>
}""")
    assert not modified
    body = out.graph.node(1).attributes["body"].as_graph()
    assert [n.op_type for n in body] == ["Identity", "Concat", "Shape", "Slice"]


@pytest.mark.parametrize(
    ("x_type", "body", "out_type", "expected"),
    [
        ("float[2, 3]", "s = Shape(x)", "int64[2]", [2, 3]),
        ("float[N, 3]", "full = Shape(x)\n  s = Gather(full, one)", "int64[1]", [3]),
    ],
)
def test_graph_output_becomes_a_constant_node_with_its_name_and_type(
    x_type, body, out_type, expected
):
    _, out, modified = run(f"""
g ({x_type} x) => ({out_type} s) <int64[1] one = {{1}}> {{
  {body}
}}""")
    assert modified
    assert op_list(out) == ["Constant"]
    (output,) = out.graph.outputs
    assert output.name == "s" and output.dtype == ir.DataType.INT64
    assert list(output.shape) == [len(expected)]
    assert output.producer().attributes["value"].as_tensor().numpy().tolist() == expected


def test_cast_like_becomes_cast_of_the_static_dtype():
    """CastLike reads only the dtype of its second input (dynamo's ``CastLike(16, q)`` in the
    attention scale): it becomes a Cast, so a constant first input can fold."""
    _, out, modified = run("""
g (float[2, N] q, int64[1] k) => (float[2, N] y) {
  c = CastLike(k, q)
  y = Mul(q, c)
}""")
    assert modified
    assert op_list(out) == ["Cast", "Mul"]
    cast = next(n for n in out.graph if n.op_type == "Cast")
    assert cast.attributes.get_int("to") == ir.DataType.FLOAT.value
    assert cast.outputs[0].name == "c"


def test_dim_proven_by_a_computed_reshape_target_folds():
    """The dynamo exporter (optimize=False) splits heads with ``Reshape(x, Concat(batch,
    seq, -1, D))``, each size read as ``Reshape(Squeeze(Shape(x)[i:i+1]), [-1])``. ONNX's
    data propagation stops at that Reshape, so the -1 (the head count) stays unknown to it;
    ``infer_shapes`` proves it (B * S * 8 / (B * S * 4) = 2, graph_passes/shapes.py), and the
    head count read back with ``Gather(Shape(q), 1)`` folds. The sequence read stays."""
    _, out, modified = run(
        """
g (float[B, S, 8] x) => (float[B, 2, S, 4] y, int64[1] seq_len)
  <int64[1] minus_one = {-1}, int64[1] one = {1}, int64[1] two = {2}, int64[1] four = {4}> {
{sizes}
  target = Concat <axis = 0> (batch, seq, minus_one, four)
  r = Reshape(x, target)
  q = Transpose <perm = [0, 2, 1, 3]> (r)
  shape = Shape(q)
  heads = Gather <axis = 0> (shape, one)
  h = Cast <to = 1> (heads)
  y = Div(q, h)
  seq_len = Gather <axis = 0> (shape, two)
}""".replace("{sizes}", dynamo_sizes("x"))
    )
    assert modified
    assert folded(out.graph) == {"heads_folded": [2]}
    assert "Gather" in op_list(out)  # the sequence length is dynamic
