"""fuse_gelu: erf and tanh GELU become one Gelu/FastGelu (contrib on cpu, standard Gelu on
portable at opset 20), near misses and blocked targets are left exactly as they were."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fusions.gelu import FuseGelu, match_gelu
from graph_passes.shapes import infer_shapes
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

# The fused kernels use their own erf/tanh approximations: a few float32 ulps apart.
TOL = {"rtol": 1e-5, "atol": 1e-5}

ERF_LEGACY = """
  d = Div(x, sqrt2)
  e = Erf(d)
  a = Add(e, one)
  m = Mul(x, a)
  y = Mul(m, half)"""
ERF_DYNAMO = """
  d = Div(x, sqrt2)
  e = Erf(d)
  a = Add(e, one)
  m = Mul(half, a)
  y = Mul(x, m)"""
ERF_HALF_FIRST = """
  d = Mul(x, rsqrt2)
  e = Erf(d)
  a = Add(one, e)
  h = Mul(half, x)
  y = Mul(a, h)"""
TANH_POW = """
  c = Pow(x, three)
  w = Mul(kappa, c)
  v = Add(x, w)
  u = Mul(v, beta)
  t = Tanh(u)
  a = Add(t, one)
  h = Mul(x, half)
  y = Mul(h, a)"""
TANH_MUL_CUBE = """
  sq = Mul(x, x)
  c = Mul(sq, x)
  w = Mul(c, kappa)
  v = Add(w, x)
  u = Mul(beta, v)
  t = Tanh(u)
  a = Add(t, one)
  m = Mul(x, a)
  y = Mul(m, half)"""


def graph(body: str, opset: int = 17, extra_in: str = "", extra_out: str = "", **consts) -> str:
    values = {
        "sqrt2": "1.4142135",
        "rsqrt2": "0.70710677",
        "one": "1.0",
        "half": "0.5",
        "three": "3.0",
        "kappa": "0.044715",
        "beta": "0.7978845608",
        **consts,
    }
    inits = ", ".join(f"float {k} = {{{v}}}" for k, v in values.items())
    return f"""<ir_version: 10, opset_import: ["" : {opset}]>
g (float[N, S, 8] x0{extra_in}) => (float[N, S, 8] out{extra_out})
<{inits}> {{
  x = Neg(x0)
  {body.strip()}
  out = Relu(y)
}}"""


def run(text: str, target: Target | None = None, feeds=None):
    model = model_from_text(text)
    pass_ = FuseGelu(target)
    candidate, result = apply_pass(pass_, model)
    assert result.modified == (pass_.matches > 0)
    check(candidate)  # com.microsoft nodes pass too: the checker skips unknown domains
    assert_parity(model, candidate, feeds, **TOL)
    assert not FuseGelu(target)(candidate.clone()).modified, "second run must find nothing"
    return model, candidate, pass_


def fused(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if "Gelu" in n.op_type]
    return node


FIRE = {
    "erf_legacy": (ERF_LEGACY, "Gelu"),
    "erf_dynamo": (ERF_DYNAMO, "Gelu"),
    "erf_half_first_mul_rsqrt2": (ERF_HALF_FIRST, "Gelu"),
    "tanh_pow": (TANH_POW, "FastGelu"),
    "tanh_mul_cube": (TANH_MUL_CUBE, "FastGelu"),
}


@pytest.mark.parametrize(("body", "op"), FIRE.values(), ids=FIRE.keys())
def test_cpu_target_emits_contrib_op(body, op):
    _, out, pass_ = run(graph(body))
    assert pass_.matches == 1 and op_list(out) == ["Neg", op, "Relu"]
    node = fused(out)
    assert node.domain == "com.microsoft" and [v.name for v in node.inputs] == ["x"]
    assert node.outputs[0].name == "y"
    assert out.opset_imports["com.microsoft"] == 1


@pytest.mark.parametrize(("body", "op"), FIRE.values(), ids=FIRE.keys())
def test_portable_opset20_emits_standard_gelu(body, op):
    _, out, pass_ = run(graph(body, opset=20), Target("portable"))
    assert pass_.matches == 1 and op_list(out) == ["Neg", "Gelu", "Relu"]
    node = fused(out)
    assert node.domain == ""
    assert node.attributes.get_string("approximate") == ("none" if op == "Gelu" else "tanh")
    assert "com.microsoft" not in out.opset_imports


@pytest.mark.parametrize("body", [ERF_LEGACY, TANH_POW], ids=["erf", "tanh"])
def test_portable_below_opset20_is_blocked(body):
    model, out, pass_ = run(graph(body), Target("portable"))
    assert pass_.matches == 0 and pass_.blocked == 1
    assert op_list(out) == op_list(model)


def test_graph_output_keeps_name():
    text = graph(ERF_LEGACY).replace("out = Relu(y)", "").replace("out)", "y)")
    _, out, _ = run(text)
    assert op_list(out) == ["Neg", "Gelu"]
    assert out.graph.outputs[0].name == "y"


KEEP = {
    "sqrt2_is_1.4": graph(ERF_LEGACY, sqrt2="1.4"),
    "half_is_0.4": graph(ERF_DYNAMO, half="0.4"),
    "one_is_1.01": graph(ERF_LEGACY, one="1.01"),
    "kappa_wrong": graph(TANH_POW, kappa="0.05"),
    "beta_wrong": graph(TANH_POW, beta="0.8"),
    "pow_two": graph(TANH_POW, three="2.0"),
    "div_of_other_value": graph(ERF_LEGACY.replace("Div(x, sqrt2)", "Div(x0, sqrt2)")),
    "sqrt2_graph_input": graph(ERF_LEGACY.replace("sqrt2)", "s)"), extra_in=", float s"),
    "erf_shared": graph(ERF_LEGACY, extra_out=", float[N, S, 8] e"),
    "bracket_shared": graph(ERF_LEGACY.replace("half)", "half)\n  y2 = Add(y, a)")).replace(
        "Relu(y)", "Relu(y2)"
    ),
    "half_product_shared": graph(ERF_HALF_FIRST, extra_out=", float[N, S, 8] h"),
    "const_rank2_broadcasts": graph(ERF_LEGACY).replace(
        "float half = {0.5}", "float[1,1] half = {0.5}"
    ),
}
KEEP_FEEDS = {"sqrt2_graph_input": {"s": np.array(1.4142135, np.float32)}}


@pytest.mark.parametrize("name", KEEP.keys())
def test_near_miss_is_kept(name):
    feeds = None
    if name in KEEP_FEEDS:
        rng = np.random.default_rng(0)
        feeds = [
            {"x0": rng.standard_normal((n, s, 8)).astype(np.float32), **KEEP_FEEDS[name]}
            for n, s in ((1, 3), (2, 5))
        ]
    model, out, pass_ = run(KEEP[name], feeds=feeds)
    assert pass_.matches == 0 and pass_.blocked == 0
    assert op_list(out) == op_list(model)


def test_match_gelu_is_reusable_without_rewriting():
    model = model_from_text(graph(TANH_POW))
    infer_shapes(model)  # the matcher needs x's rank
    matches = [m for n in model.graph if (m := match_gelu(n)) is not None]
    assert len(matches) == 1 and matches[0].approximate == "tanh"
    assert len(matches[0].nodes) == 8
