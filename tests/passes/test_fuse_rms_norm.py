"""fuse_rms_norm: a Llama-style RMSNorm becomes RMSNormalization (opset 23) or, after a
residual Add on contrib targets, SkipSimplifiedLayerNormalization; near misses are kept."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fusions.rms_norm import FuseRMSNorm
from graph_passes.target import kernel_timing
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

TOL = {"rtol": 1e-4, "atol": 1e-5}
LINES = {
    "pre": "x = Relu(x0)",
    "sq": "sq = Pow(x, two)",
    "var": "var = ReduceMean<axes = [-1]>(sq)",
    "ve": "ve = Add(var, eps)",
    "std": "std = Sqrt(ve)",
    "r": "r = Reciprocal(std)",
    "n": "n = Mul(x, r)",
    "y": "y = Mul(gamma, n)",
    "post": "out = Neg(y)",
}
AXES_INPUT = {"var": "var = ReduceMean(sq, am1)"}


def graph(opset=23, extra_in="", extra_out="", **lines):
    body = "\n  ".join(line for line in {**LINES, **lines}.values() if line)
    return f"""<ir_version: 11, opset_import: ["" : {opset}]>
g (float[N, S, 4] x0, float[N, S, 4] h{extra_in}) => (float[N, S, 4] out{extra_out})
<float[4] gamma = {{0.5, -1.0, 2.0, 1.5}}, float[1, 4] gamma2 = {{0.5, -1.0, 2.0, 1.5}},
 float eps = {{0.000001}}, float two = {{2.0}}, float one = {{1.0}}, int64[1] am1 = {{-1}},
 float[4] bias = {{1.0, -2.0, 0.5, 0.25}}> {{
  {body}
}}"""


def run(text: str, target: Target | None = None, feeds=None):
    model = model_from_text(text)
    pass_ = FuseRMSNorm(target)
    candidate, result = apply_pass(pass_, model)
    assert result.modified == (pass_.matches > 0)
    check(candidate)  # the checker skips com.microsoft nodes, the rest is fully checked
    assert_parity(model, candidate, feeds, **TOL)
    assert not FuseRMSNorm(target)(candidate.clone()).modified, "second run must find nothing"
    return model, candidate, pass_


def only(model: ir.Model, op: str) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == op]
    return node


FIRE = {
    "reciprocal": {**AXES_INPUT},
    "div": {**AXES_INPUT, "r": "", "n": "n = Div(x, std)"},
    "div_one_mul_swapped": {**AXES_INPUT, "r": "r = Div(one, std)", "n": "n = Mul(r, x)"},
    "mul_square_gamma_last": {**AXES_INPUT, "sq": "sq = Mul(x, x)", "y": "y = Mul(n, gamma)"},
}


@pytest.mark.parametrize("lines", FIRE.values(), ids=FIRE.keys())
@pytest.mark.parametrize("target", ["cpu", "portable"])
def test_opset23_emits_rms_normalization(lines, target):
    _, out, pass_ = run(graph(**lines), Target(target))
    assert pass_.matches == 1 and op_list(out) == ["Relu", "RMSNormalization", "Neg"]
    node = only(out, "RMSNormalization")
    assert node.domain == "" and [v.name for v in node.inputs] == ["x", "gamma"]
    assert node.attributes.get_float("epsilon") == pytest.approx(1e-6)
    assert node.attributes.get_int("axis") == -1 and node.outputs[0].name == "y"


RESIDUAL = {"pre": "x = Add(x0, h)", "post": "o = Neg(y)\n  out = Add(o, x)"}


@pytest.mark.parametrize("opset", [17, 23])
def test_residual_add_becomes_skip_simplified_on_cpu(opset):
    lines = {**RESIDUAL} if opset < 18 else {**RESIDUAL, **AXES_INPUT}
    _, out, pass_ = run(graph(opset, **lines))
    assert pass_.matches == 1
    assert op_list(out) == ["SkipSimplifiedLayerNormalization", "Neg", "Add"]
    node = only(out, "SkipSimplifiedLayerNormalization")
    assert node.domain == "com.microsoft"
    assert [v.name for v in node.inputs] == ["x0", "h", "gamma"]
    assert node.outputs[3].name == "x"


def test_residual_with_bias_folds_bias():
    lines = {**RESIDUAL, "pre": "t = Add(x0, bias)\n  x = Add(t, h)"}
    _, out, _ = run(graph(17, **lines))
    node = only(out, "SkipSimplifiedLayerNormalization")
    assert [v.name for v in node.inputs] == ["x0", "h", "gamma", "bias"]


def test_below_opset23_without_residual_is_blocked():
    model, out, pass_ = run(graph(17))
    assert pass_.matches == 0 and pass_.blocked == 1 and op_list(out) == op_list(model)


def test_portable_below_23_is_blocked_even_with_residual():
    model, out, pass_ = run(graph(17, **RESIDUAL), Target("portable"))
    assert pass_.blocked == 1 and op_list(out) == op_list(model)


KEEP = {
    "eps_graph_input": graph(extra_in=", float e", ve="ve = Add(var, e)", **AXES_INPUT),
    "gamma_rank2": graph(y="y = Mul(gamma2, n)", **AXES_INPUT),
    "gamma_graph_input": graph(extra_in=", float[4] gi", y="y = Mul(gi, n)", **AXES_INPUT),
    "pow_exponent_one": graph(sq="sq = Pow(x, one)", **AXES_INPUT),
    "axis_not_last": graph(var="var = ReduceMean<axes = [1]>(sq)", opset=17),
    "keepdims_0": graph(var="var = ReduceMean<axes = [-1], keepdims = 0>(sq)", opset=17).replace(
        "n = Mul(x, r)", "ru = Unsqueeze(r, am1)\n  n = Mul(x, ru)"
    ),
    "reciprocal_shared": graph(extra_out=", float[N, S, 1] r", **AXES_INPUT),
    "square_of_other": graph(sq="sq = Pow(x0, two)", **AXES_INPUT),
    "div_not_by_one": graph(r="r = Div(two, std)", **AXES_INPUT),
    "layer_norm_tail": graph(pre="mu = ReduceMean(x0, am1)\n  x = Sub(x0, mu)", **AXES_INPUT),
}
FEEDS = {
    "eps_graph_input": {"e": np.array(1e-6, np.float32)},
    "gamma_graph_input": {"gi": np.array([0.5, -1.0, 2.0, 1.5], np.float32)},
}


@pytest.mark.parametrize("name", KEEP.keys())
def test_near_miss_is_kept(name):
    feeds = None
    if name in FEEDS:
        rng = np.random.default_rng(0)
        feeds = [
            {
                "x0": rng.standard_normal((n, s, 4)).astype(np.float32),
                "h": rng.standard_normal((n, s, 4)).astype(np.float32),
                **FEEDS[name],
            }
            for n, s in ((1, 3), (2, 5))
        ]
    model, out, pass_ = run(KEEP[name], feeds=feeds)
    assert pass_.matches == 0 and pass_.blocked == 0 and op_list(out) == op_list(model)


def test_residual_fusion_on_a_timed_target(monkeypatch, tmp_path):
    """The residual (SkipSimplified) path timed on a cpu target: it once crashed with
    "'FuseSkipLayerNorm' object has no attribute '_model'" (rms_norm borrowed a half-set-up
    skip_layer_norm pass to fuse the residual)."""
    monkeypatch.setenv("OVO_CACHE_DIR", str(tmp_path))
    timed = []

    def faster(original, candidate, threads, shadows):
        timed.append(shadows)
        return 0.8, 9, "faster", 0.0

    monkeypatch.setattr(kernel_timing, "_measure", faster)
    _, out, _ = run(graph(opset=17, **RESIDUAL), Target("cpu", time_kernels=True))
    assert op_list(out) == ["SkipSimplifiedLayerNormalization", "Neg", "Add"]
    assert timed == [FuseRMSNorm.shadows]
