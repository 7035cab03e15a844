"""fuse_skip_layer_norm: residual Add (+ bias) + LayerNorm (standard or decomposed) becomes one
SkipLayerNormalization; shapes ORT's kernel refuses, non-last axes and portable are left."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fusions.skip_layer_norm import FuseSkipLayerNorm
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

TOL = {"rtol": 1e-4, "atol": 1e-5}
LINES = {
    "pre": "a = Relu(a0)",
    "mm": "m = MatMul(a, w)",
    "bias": "t = Add(m, bias)",
    "sum": "s = Add(t, b0)",
    "ln": "z = LayerNormalization<axis = -1, epsilon = 0.001>(s, gamma, beta)",
    "post": "out = Neg(z)",
}
DECOMPOSED = """mean = ReduceMean<axes = [-1]>(s)
  d = Sub(s, mean)
  sq = Pow(d, two)
  var = ReduceMean<axes = [-1]>(sq)
  ve = Add(var, eps)
  std = Sqrt(ve)
  n = Div(d, std)
  y = Mul(n, gamma)
  z = Add(y, beta)"""


def graph(opset=17, a_shape="N, S, 4", b_shape="N, S, 4", extra_in="", extra_out="", **lines):
    body = "\n  ".join(line for line in {**LINES, **lines}.values() if line)
    return f"""<ir_version: 8, opset_import: ["" : {opset}]>
g (float[{a_shape}] a0, float[{b_shape}] b0{extra_in}) => (float[N, S, 4] out{extra_out})
<float[4] gamma = {{0.5, -1.0, 2.0, 1.5}}, float[4] beta = {{0.1, 0.2, -0.3, 0.0}},
 float[4] bias = {{1.0, -2.0, 0.5, 0.25}}, float[1, 4] bias2 = {{1.0, -2.0, 0.5, 0.25}},
 float[4, 4] w = {{1., 2., 0., -1., 0.5, 1., 1., 0., -1., 0., 2., 1., 0., 0., 1., 3.}},
 float eps = {{0.001}}, float two = {{2.0}}, float[1] g1 = {{2.0}}> {{
  {body}
}}"""


def run(text: str, target: Target | None = None, feeds=None):
    model = model_from_text(text)
    pass_ = FuseSkipLayerNorm(target)
    candidate, result = apply_pass(pass_, model)
    assert result.modified == (pass_.matches > 0)
    check(candidate)  # the checker skips com.microsoft nodes, the rest is fully checked
    assert_parity(model, candidate, feeds, **TOL)
    assert not FuseSkipLayerNorm(target)(candidate.clone()).modified, "second run: nothing"
    return model, candidate, pass_


def skip_ln(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "SkipLayerNormalization"]
    assert node.domain == "com.microsoft"
    return node


def names(node: ir.Node) -> list[str]:
    return ["" if v is None else v.name for v in node.inputs]


def test_bias_is_folded():
    _, out, pass_ = run(graph())
    assert pass_.matches == 1 and op_list(out) == [
        "Relu",
        "MatMul",
        "SkipLayerNormalization",
        "Neg",
    ]
    node = skip_ln(out)
    assert names(node) == ["m", "b0", "gamma", "beta", "bias"]
    assert node.attributes.get_float("epsilon") == pytest.approx(0.001)
    assert len(node.outputs) == 1 and node.outputs[0].name == "z"


def test_plain_add_operands_swapped():
    _, out, _ = run(graph(mm="", bias="", sum="s = Add(b0, a)"))
    assert op_list(out) == ["Relu", "SkipLayerNormalization", "Neg"]
    assert names(skip_ln(out)) == ["b0", "a", "gamma", "beta"]


def test_residual_sum_comes_from_fourth_output():
    _, out, pass_ = run(graph(post="o1 = Neg(z)\n  out = Add(o1, s)"))
    assert pass_.matches == 1
    assert op_list(out) == ["Relu", "MatMul", "SkipLayerNormalization", "Neg", "Add"]
    node = skip_ln(out)
    assert len(node.outputs) == 4 and node.outputs[3].name == "s"
    assert [u.node.op_type for u in node.outputs[3].uses()] == ["Add"]


def test_sum_used_before_layer_norm_in_node_order():
    _, out, _ = run(
        graph(sum="s = Add(t, b0)\n  r = Neg(s)", post="o1 = Neg(z)\n  out = Add(o1, r)")
    )
    assert op_list(out) == ["Relu", "MatMul", "SkipLayerNormalization", "Neg", "Neg", "Add"]


def test_sum_is_graph_output():
    _, out, _ = run(graph(extra_out=", float[N, S, 4] s"))
    node = skip_ln(out)
    assert [v.name for v in out.graph.outputs] == ["out", "s"]
    assert out.graph.outputs[1] is node.outputs[3]


@pytest.mark.parametrize("b_shape", ["1, S, 4", "S, 4"])
def test_skip_broadcast_over_batch(b_shape):
    _, out, _ = run(graph(b_shape=b_shape))
    assert names(skip_ln(out))[:2] == ["m", "b0"]


def test_no_beta():
    _, out, _ = run(graph(ln="z = LayerNormalization<axis = -1, epsilon = 0.001>(s, gamma)"))
    assert names(skip_ln(out)) == ["m", "b0", "gamma", "", "bias"]


@pytest.mark.parametrize("opset", [14, 17])
def test_decomposed_layer_norm(opset):
    _, out, pass_ = run(graph(opset, ln=DECOMPOSED))
    assert pass_.matches == 1
    assert op_list(out) == ["Relu", "MatMul", "SkipLayerNormalization", "Neg"]
    assert names(skip_ln(out)) == ["m", "b0", "gamma", "beta", "bias"]


def test_decomposed_with_residual_at_opset14():
    _, out, _ = run(graph(14, ln=DECOMPOSED, post="o1 = Neg(z)\n  out = Add(o1, s)"))
    assert op_list(out) == ["Relu", "MatMul", "SkipLayerNormalization", "Neg", "Add"]


def test_bias_not_folded_when_shared_or_wrong_shape():
    _, out, _ = run(graph(bias="t = Add(m, bias2)"))  # [1, 4]: not a [C] bias
    assert op_list(out) == ["Relu", "MatMul", "Add", "SkipLayerNormalization", "Neg"]
    _, out, _ = run(graph(post="o1 = Neg(z)\n  out = Add(o1, t)"))  # t used elsewhere
    assert op_list(out) == ["Relu", "MatMul", "Add", "SkipLayerNormalization", "Neg", "Add"]
    assert names(skip_ln(out))[:2] == ["t", "b0"]


def test_bias_graph_input_not_folded():
    text = graph(extra_in=", float[4] bi", bias="t = Add(m, bi)")
    rng = np.random.default_rng(0)
    feeds = [
        {
            "a0": rng.standard_normal((2, 3, 4)).astype(np.float32),
            "b0": rng.standard_normal((2, 3, 4)).astype(np.float32),
            "bi": np.array([1.0, -2.0, 0.5, 0.25], np.float32),
        }
    ]
    _, out, _ = run(text, feeds=feeds)
    assert op_list(out) == ["Relu", "MatMul", "Add", "SkipLayerNormalization", "Neg"]


KEEP = {
    "skip_broadcast_over_sequence": graph(b_shape="N, 1, 4"),
    "both_operands_broadcast": graph(
        mm="", bias="", sum="s = Add(a, b0)", a_shape="1, S, 4", b_shape="N, 1, 4"
    ),
    "skip_other_sequence_symbol": graph(b_shape="N, T, 4"),
    "rank4": graph(
        mm="", bias="", sum="s = Add(a, b0)", a_shape="N, S, 2, 4", b_shape="N, S, 2, 4"
    ).replace("float[N, S, 4] out", "float[N, S, 2, 4] out"),
    "axis_not_last": graph(ln="z = LayerNormalization<axis = 1, epsilon = 0.001>(s, gamma, beta)"),
    "stash_type_0": graph(
        ln="z = LayerNormalization<axis = -1, epsilon = 0.001, stash_type = 0>(s, gamma, beta)"
    ),
    "gamma_broadcast_shape_1": graph(ln="z = LayerNormalization<axis = -1>(s, g1, beta)"),
    "mean_output_used": graph(
        ln="z, mu = LayerNormalization<axis = -1, epsilon = 0.001>(s, gamma, beta)",
        post="o1 = Neg(z)\n  out = Add(o1, mu)",
    ),
    "no_add": graph(sum="s = Mul(t, b0)"),
    "decomposed_wrong_axis": graph(ln=DECOMPOSED.replace("axes = [-1]>(s)", "axes = [1]>(s)")),
}


@pytest.mark.parametrize("name", KEEP.keys())
def test_near_miss_is_kept(name):
    text = KEEP[name]
    feeds = None
    if name == "skip_other_sequence_symbol":
        rng = np.random.default_rng(0)
        feeds = [
            {
                "a0": rng.standard_normal((2, 3, 4)).astype(np.float32),
                "b0": rng.standard_normal((2, 3, 4)).astype(np.float32),
            }
        ]
    model, out, pass_ = run(text, feeds=feeds)
    assert pass_.matches == 0 and op_list(out) == op_list(model)


def test_portable_emits_nothing():
    model, out, pass_ = run(graph(), Target("portable"))
    assert pass_.matches == 0 and op_list(out) == op_list(model)
    assert all(n.domain == "" for n in out.graph)


def test_shape_proven_by_symbolic_inference():
    # ONNX's inference gives the head merge [N, S, unk]: only ORT's symbolic inference, which
    # follows the Shape/Slice/Concat arithmetic, proves the residual Add keeps [N, S, 4].
    lines = {
        "pre": "sh = Shape(a0)\n  nb = Slice(sh, i0, i1)\n  sq = Slice(sh, i1, i2)\n"
        "  hs = Concat<axis = 0>(nb, sq, i2, i2)\n  r = Reshape(a0, hs)\n"
        "  tr = Transpose<perm = [0, 1, 3, 2]>(r)\n  s2 = Concat<axis = 0>(nb, sq, m1)\n"
        "  a = Reshape(tr, s2)",
        "mm": "",
        "bias": "",
        "sum": "s = Add(a, b0)",
    }
    text = graph(**lines).replace(
        "float[1] g1 = {2.0}>",
        "float[1] g1 = {2.0}, int64[1] i0 = {0}, int64[1] i1 = {1}, int64[1] i2 = {2},"
        " int64[1] m1 = {-1}>",
    )
    _, out, pass_ = run(text)
    assert pass_.matches == 1
    assert op_list(out)[-2:] == ["SkipLayerNormalization", "Neg"]
    assert names(skip_ln(out))[:2] == ["a", "b0"]


def test_symbolic_shape_inference_leaves_no_debris_in_the_working_directory(tmp_path, monkeypatch):
    # ORT's symbolic inference saves "sym_shape_infer_temp.onnx" into the working directory
    # when it cannot infer everything (here: an op from an unknown domain).
    from graph_passes.shapes import symbolic_dims

    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[N, 4] x) => (float[N, 4] y) {
            t = com.example.Mystery(x)
            y = Relu(t)
        }
        """
    )
    monkeypatch.chdir(tmp_path)
    symbolic_dims(model)
    assert list(tmp_path.iterdir()) == []


def test_clamped_dim_counts_as_its_symbol_only_when_sound() -> None:
    """``Min(k, S)`` (a Slice of a fixed buffer, BERT's position ids) broadcast against ``S``
    is ``S`` wherever the model runs; only for k >= 2 and the same symbol."""
    from graph_passes.fusions._residual_norm import skip_fits
    from graph_passes.shapes import clamped_to

    assert clamped_to("Min(128, sequence)", "sequence")
    assert clamped_to("Min(sequence, 512)", "sequence")
    assert not clamped_to("Min(1, sequence)", "sequence")  # 1 broadcasts: not the same dim
    assert not clamped_to("Min(128, other)", "sequence")
    assert not clamped_to("Max(128, sequence)", "sequence")
    assert not clamped_to("sequence", "sequence")
    skip, s = (1, "Min(128, sequence)", 64), ("batch", "sequence", 64)
    assert not skip_fits(skip, s)  # only for an operand of the Add that computes s
    assert skip_fits(skip, s, clamped=True)
