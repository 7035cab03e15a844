"""fuse_bias_gelu: a constant [C] bias Add in front of a fused GELU moves into BiasGelu /
FastGelu; shared sums, run-time or broadcasting biases and portable targets are left."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fusions.bias_gelu import FuseBiasGelu
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

TOL = {"rtol": 1e-5, "atol": 1e-5}


def graph(
    act="y = com.microsoft.Gelu(t)",
    add="t = Add(m, bias)",
    opset=17,
    extra_in="",
    extra_out="",
    post="out = Neg(y)",
) -> str:
    return f"""<ir_version: 10, opset_import: ["" : {opset}, "com.microsoft" : 1]>
g (float[N, S, 4] x0{extra_in}) => (float[N, S, 4] out{extra_out})
<float[4] bias = {{1.0, -2.0, 0.5, 0.25}}, float[1, 4] bias2 = {{1.0, -2.0, 0.5, 0.25}},
 float[1] b1 = {{0.5}},
 float[4, 4] w = {{1., 2., 0., -1., 0.5, 1., 1., 0., -1., 0., 2., 1., 0., 0., 1., 3.}}> {{
  m = MatMul(x0, w)
  {add}
  {act}
  {post}
}}"""


def run(text: str, target: Target | None = None, feeds=None):
    model = model_from_text(text)
    pass_ = FuseBiasGelu(target)
    candidate, result = apply_pass(pass_, model)
    assert result.modified == (pass_.matches > 0)
    check(candidate)  # the checker skips com.microsoft nodes, the rest is fully checked
    assert_parity(model, candidate, feeds, **TOL)
    assert not FuseBiasGelu(target)(candidate.clone()).modified, "second run must find nothing"
    return model, candidate, pass_


def fused(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if "Gelu" in n.op_type]
    return node


FIRE = {
    "contrib_gelu": ("y = com.microsoft.Gelu(t)", "t = Add(m, bias)", 17, "BiasGelu"),
    "contrib_fastgelu_bias_first": (
        "y = com.microsoft.FastGelu(t)",
        "t = Add(bias, m)",
        17,
        "FastGelu",
    ),
    "standard_gelu_erf": ("y = Gelu(t)", "t = Add(m, bias)", 20, "BiasGelu"),
    "standard_gelu_tanh": ('y = Gelu<approximate = "tanh">(t)', "t = Add(m, bias)", 20, "FastGelu"),
}


@pytest.mark.parametrize(("act", "add", "opset", "op"), FIRE.values(), ids=FIRE.keys())
def test_bias_is_folded(act, add, opset, op):
    _, out, pass_ = run(graph(act, add, opset))
    assert pass_.matches == 1 and op_list(out) == ["MatMul", op, "Neg"]
    node = fused(out)
    assert node.domain == "com.microsoft"
    assert [v.name for v in node.inputs] == ["m", "bias"]
    assert node.outputs[0].name == "y"


def feeds_with(**extra):
    rng = np.random.default_rng(0)
    return [
        {"x0": rng.standard_normal((n, s, 4)).astype(np.float32), **extra}
        for n, s in ((1, 3), (2, 5))
    ]


KEEP = {
    "sum_shared": (graph(post="o = Neg(y)\n  out = Add(o, t)"), None),
    "sum_is_graph_output": (graph(extra_out=", float[N, S, 4] t"), None),
    "bias_rank2": (graph(add="t = Add(m, bias2)"), None),
    "bias_scalar_broadcast": (graph(add="t = Add(m, b1)"), None),
    "bias_graph_input": (
        graph(add="t = Add(m, bi)", extra_in=", float[4] bi"),
        feeds_with(bi=np.array([1.0, -2.0, 0.5, 0.25], np.float32)),
    ),
    "fastgelu_has_bias_already": (graph(act="y = com.microsoft.FastGelu(t, bias)"), None),
    "not_a_gelu": (graph(act="y = Relu(t)"), None),
}


@pytest.mark.parametrize("name", KEEP.keys())
def test_near_miss_is_kept(name):
    text, feeds = KEEP[name]
    model, out, pass_ = run(text, feeds=feeds)
    assert pass_.matches == 0 and op_list(out) == op_list(model)


def test_portable_emits_nothing():
    model, out, pass_ = run(graph("y = Gelu(t)", opset=20), Target("portable"))
    assert pass_.matches == 0 and op_list(out) == ["MatMul", "Add", "Gelu", "Neg"]
