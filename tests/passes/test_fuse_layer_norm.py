"""fuse_layer_norm: the decomposed LayerNorm becomes one LayerNormalization (exact op list,
attributes, parity, checker, idempotence), and near misses are left exactly as they were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fusions.layer_norm import FuseLayerNorm
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

TOL = {"rtol": 1e-4, "atol": 1e-5}
LINES = {  # name -> line of the decomposed LayerNorm; tests swap single lines
    "pre": "x = Relu(x0)",
    "mean": "mean = ReduceMean<axes = [-1]>(x)",
    "d": "d = Sub(x, mean)",
    "sq": "sq = Pow(d, two)",
    "var": "var = ReduceMean<axes = [-1]>(sq)",
    "ve": "ve = Add(var, eps)",
    "std": "std = Sqrt(ve)",
    "n": "n = Div(d, std)",
    "y": "y = Mul(n, gamma)",
    "z": "z = Add(y, beta)",
    "post": "out = Neg(z)",
}
AROUND = ["Relu", "LayerNormalization", "Neg"]


def graph(opset: int = 17, dtype: str = "float", extra_in: str = "", extra_out: str = "", **lines):
    body = "\n  ".join(line for line in {**LINES, **lines}.values() if line)
    return f"""<ir_version: 8, opset_import: ["" : {opset}]>
g ({dtype}[N, S, 4] x0{extra_in}) => ({dtype}[N, S, 4] out{extra_out})
<{dtype}[4] gamma = {{0.5, -1.0, 2.0, 1.5}}, {dtype}[4] beta = {{0.1, 0.2, -0.3, 0.0}},
 {dtype} eps = {{0.001}}, {dtype} two = {{2.0}}, int64[1] am1 = {{-1}}, int64[1] a2 = {{2}},
 int64[1] a1 = {{1}}> {{
  {body}
}}"""


def run(text: str | ir.Model, feeds=None, tol=TOL) -> tuple[ir.Model, ir.Model, FuseLayerNorm]:
    model = model_from_text(text) if isinstance(text, str) else text
    pass_ = FuseLayerNorm()
    candidate, result = apply_pass(pass_, model)
    assert result.modified == (pass_.matches > 0)
    check(candidate)
    assert_parity(model, candidate, feeds, **tol)
    assert not FuseLayerNorm()(candidate.clone()).modified, "second run must find nothing"
    return model, candidate, pass_


def layer_norm(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "LayerNormalization"]
    return node


FIRE = {  # name: (graph text, bias kept)
    "opset17_attribute_axes": (graph(), True),
    "opset18_input_axes": (
        graph(
            18,
            mean="mean = ReduceMean(x, am1)",
            var="var = ReduceMean(sq, a2)",  # rank 3: axis 2 is the last one
        ),
        True,
    ),
    "mul_square_swapped_operands": (
        graph(
            sq="sq = Mul(d, d)",
            ve="ve = Add(eps, var)",
            y="y = Mul(gamma, n)",
            z="z = Add(beta, y)",
        ),
        True,
    ),
    "reciprocal_mul": (graph(n="r = Reciprocal(std)\n  n = Mul(r, d)"), True),
    "no_beta": (graph(y="z = Mul(n, gamma)", z=""), False),
    "non_negative_last_axis": (
        graph(mean="mean = ReduceMean<axes = [2]>(x)", var="var = ReduceMean<axes = [2]>(sq)"),
        True,
    ),
}


@pytest.mark.parametrize(("text", "bias"), FIRE.values(), ids=FIRE.keys())
def test_layer_norm_is_fused(text, bias):
    _, out, pass_ = run(text)
    assert pass_.matches == 1 and op_list(out) == AROUND
    node = layer_norm(out)
    names = [v.name for v in node.inputs]
    assert names == (["x", "gamma", "beta"] if bias else ["x", "gamma"])
    assert node.attributes.get_int("axis") == -1
    assert node.attributes.get_float("epsilon") == pytest.approx(0.001)
    assert node.outputs[0].name == "z"


def test_graph_output_keeps_its_name_and_type():
    text = graph(post="").replace("=> (float[N, S, 4] out)", "=> (float[N, S, 4] z)")
    _, out, _ = run(text)
    assert op_list(out) == ["Relu", "LayerNormalization"]
    (z,) = out.graph.outputs
    assert z.name == "z" and z.producer().op_type == "LayerNormalization"
    assert z.dtype == ir.DataType.FLOAT and [str(d) for d in z.shape] == ["N", "S", "4"]


def test_float16_keeps_dtype():
    # ONNX text has no float16 literals: build in float, then convert every float tensor.
    model = model_from_text(graph())
    for value in model.graph.initializers.values():
        array = value.const_value.numpy()
        if array.dtype == np.float32:
            value.const_value = ir.tensor(array.astype(np.float16), name=value.name)
            value.dtype = ir.DataType.FLOAT16
    for value in (*model.graph.inputs, *model.graph.outputs):
        value.dtype = ir.DataType.FLOAT16
    # The fused op keeps float32 statistics (stash_type=1), the chain rounds every step to
    # float16: a few float16 ulps apart (float16 ulp at 1 is ~1e-3).
    _, out, _ = run(model, tol={"rtol": 1e-2, "atol": 1e-2})
    assert op_list(out) == AROUND
    node = layer_norm(out)
    assert node.outputs[0].dtype == ir.DataType.FLOAT16
    assert node.outputs[0].name == "z"


def test_two_layer_norms_in_a_row():
    second = [
        "m2 = ReduceMean<axes = [-1]>(x2)",
        "d2 = Sub(x2, m2)",
        "s2 = Pow(d2, two)",
        "v2 = ReduceMean<axes = [-1]>(s2)",
        "e2 = Add(v2, eps)",
        "t2 = Sqrt(e2)",
        "n2 = Div(d2, t2)",
        "out = Mul(n2, gamma)",
    ]
    _, out, pass_ = run(graph(post="x2 = Neg(z)\n  " + "\n  ".join(second)))
    assert pass_.matches == 2
    assert op_list(out) == ["Relu", "LayerNormalization", "Neg", "LayerNormalization"]


KEEP = {
    "axes_not_last": graph(
        mean="mean = ReduceMean<axes = [1]>(x)", var="var = ReduceMean<axes = [1]>(sq)"
    ),
    "axes_two": graph(
        mean="mean = ReduceMean<axes = [1, 2]>(x)", var="var = ReduceMean<axes = [1, 2]>(sq)"
    ),
    "keepdims_0": graph(
        mean="mean = ReduceMean<axes = [-1], keepdims = 0>(x)",
        d="mu = Unsqueeze(mean, am1)\n  d = Sub(x, mu)",
    ),
    "keepdims_0_broadcast": graph(  # x - mean broadcasts [N, S] over S == 4: not a LayerNorm
        mean="mean = ReduceMean<axes = [-1], keepdims = 0>(x)",
        var="var = ReduceMean<axes = [-1], keepdims = 0>(sq)",
    ),
    "opset16": graph(16),
    "opset18_axes_not_constant": graph(
        18,
        extra_in=", int64[1] k",
        mean="mean = ReduceMean(x, k)",
        var="var = ReduceMean(sq, am1)",
    ),
    "pow_three": graph(
        sq="sq = Pow(d, two)\n  sq3 = Mul(sq, d)", var="var = ReduceMean<axes = [-1]>(sq3)"
    ),
    "sub_of_other_mean": graph(d="d = Sub(x0, mean)"),
    "eps_not_constant": graph(extra_in=", float e", ve="ve = Add(var, e)"),
    "gamma_graph_input": graph(extra_in=", float[4] g", y="y = Mul(n, g)"),
    "mean_used_elsewhere": graph(post="w = Neg(z)\n  out = Add(w, mean)"),
    "d_used_elsewhere": graph(post="w = Neg(z)\n  out = Add(w, d)"),
    "std_used_elsewhere": graph(post="w = Neg(z)\n  out = Add(w, std)"),
    "n_used_elsewhere": graph(post="w = Neg(z)\n  out = Add(w, n)"),
    "var_is_graph_output": graph(extra_out=", float[N, S, 1] var"),
}


EXTRA_FEEDS = {  # graph inputs besides x0 of the near misses that have them
    "keepdims_0_broadcast": {"x0": np.arange(64, dtype=np.float32).reshape(4, 4, 4) % 5},
    "opset18_axes_not_constant": {"k": np.array([-1])},
    "eps_not_constant": {"e": np.array(1e-3, np.float32)},
    "gamma_graph_input": {"g": np.array([0.5, -1.0, 2.0, 1.5], np.float32)},
}


def feeds_with(extra: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """x0 at two batch/sequence sizes (the dims are dynamic) plus ``extra``."""
    rng = np.random.default_rng(0)
    return [
        {"x0": rng.standard_normal((n, s, 4)).astype(np.float32), **extra}
        for n, s in ((1, 3), (2, 5))
    ]


@pytest.mark.parametrize("name", KEEP.keys())
def test_near_miss_is_kept(name):
    text = KEEP[name]
    feeds = feeds_with(EXTRA_FEEDS[name]) if name in EXTRA_FEEDS else None
    model, out, pass_ = run(text, feeds)
    assert pass_.matches == 0 and op_list(out) == op_list(model)
    assert pass_.blocked == (name == "opset16")  # matched, but the op needs opset 17


def test_opset16_counts_blocked_matches():
    _, _, pass_ = run(graph(16))
    assert pass_.matches == 0 and pass_.blocked == 1


def test_beta_not_constant_fuses_without_bias():
    # The Add of a run-time beta stays; the rest is still a LayerNorm with scale only.
    text = graph(extra_in=", float[4] b", z="z = Add(y, b)")
    feeds = feeds_with({"b": np.array([0.1, 0.2, -0.3, 0.0], np.float32)})
    _, out, pass_ = run(text, feeds)
    assert pass_.matches == 1 and op_list(out) == ["Relu", "LayerNormalization", "Add", "Neg"]
    assert [v.name for v in layer_norm(out).inputs] == ["x", "gamma"]


@pytest.mark.slow
def test_minilm_torch_legacy_export(tmp_path: Path):
    """MiniLM has 13 LayerNorms: decomposed at opset 14 (blocked), native at opset 17."""
    pytest.importorskip("torch")
    from models.minilm import export_minilm

    m14 = ir.load(export_minilm(tmp_path / "m14.onnx", exporter="torch-legacy", opset=14))
    blocked = FuseLayerNorm()
    assert not blocked(m14.clone()).modified and blocked.blocked == 13
    m14.opset_imports[""] = 17  # nothing in this graph changed meaning between 14 and 17
    fused, result = apply_pass(FuseLayerNorm(), m14)
    assert result.modified
    assert sum(n.op_type == "LayerNormalization" for n in fused.graph) == 13
    assert not any(n.op_type == "ReduceMean" for n in fused.graph)
    check(fused)
    assert_parity(m14, fused, **TOL)
