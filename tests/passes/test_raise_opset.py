"""raise_opset: converts up to the target's opset (so opset-gated fusions can fire), never
lowers, and leaves the model untouched when the converter fails."""

from __future__ import annotations

import onnx_ir as ir

from graph_passes.cleanup.raise_opset import RaiseOpset
from graph_passes.fusions.layer_norm import FuseLayerNorm
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

TOL = {"rtol": 1e-4, "atol": 1e-5}
DECOMPOSED_14 = """<ir_version: 7, opset_import: ["" : 14]>
g (float[N, S, 4] x0) => (float[N, S, 4] out)
<float[4] gamma = {0.5, -1.0, 2.0, 1.5}, float[4] beta = {0.1, 0.2, -0.3, 0.0},
 float eps = {0.001}, float two = {2.0}> {
  x = Relu(x0)
  mean = ReduceMean<axes = [-1]>(x)
  d = Sub(x, mean)
  sq = Pow(d, two)
  var = ReduceMean<axes = [-1]>(sq)
  ve = Add(var, eps)
  std = Sqrt(ve)
  n = Div(d, std)
  y = Mul(n, gamma)
  z = Add(y, beta)
  out = Neg(z)
}"""


def test_raise_to_17_lets_layer_norm_fuse():
    model = model_from_text(DECOMPOSED_14)
    blocked = FuseLayerNorm()
    assert not blocked(model.clone()).modified and blocked.blocked == 1
    pass_ = RaiseOpset(Target(raise_opset_to=17))
    raised, result = apply_pass(pass_, model)
    assert result.modified and pass_.matches == 1
    assert raised.opset_imports[""] == 17 and raised.ir_version >= 8
    assert op_list(raised) == op_list(model)
    # The converter's own inferred shapes are dropped (its anonymous dims hide equalities).
    assert all(n.outputs[0].shape is None for n in raised.graph if n.op_type != "Neg")
    # Weights are the same tensor objects (no copies of big or memory-mapped data).
    assert raised.graph.initializers["gamma"].const_value is (
        model.graph.initializers["gamma"].const_value
    )
    check(raised)
    assert_parity(model, raised, **TOL)
    fused, result = apply_pass(FuseLayerNorm(), raised)
    assert result.modified and op_list(fused) == ["Relu", "LayerNormalization", "Neg"]
    check(fused)
    assert_parity(model, fused, **TOL)


def test_raise_to_18_moves_reduce_axes_to_an_input():
    model = model_from_text(DECOMPOSED_14)
    raised, result = apply_pass(RaiseOpset(Target(raise_opset_to=18)), model)
    assert result.modified and raised.opset_imports[""] == 18
    means = [n for n in raised.graph if n.op_type == "ReduceMean"]
    assert len(means) == 2 and all(len(n.inputs) == 2 for n in means)
    check(raised)
    assert_parity(model, raised, **TOL)
    fused, _ = apply_pass(FuseLayerNorm(), raised)
    assert "LayerNormalization" in op_list(fused)


def test_never_lowers_and_off_by_default():
    model = model_from_text(DECOMPOSED_14)
    for target in (Target(), Target(raise_opset_to=13), Target(raise_opset_to=14)):
        out, result = apply_pass(RaiseOpset(target), model)
        assert not result.modified and out.opset_imports[""] == 14


def test_conversion_failure_keeps_model():
    text = DECOMPOSED_14.replace("out = Neg(z)", "out = NoSuchOp(z)")
    model = model_from_text(text)
    pass_ = RaiseOpset(Target(raise_opset_to=17))
    out, result = apply_pass(pass_, model)
    assert not result.modified and pass_.matches == 0
    assert "NoSuchOp" in pass_.failure
    assert out.opset_imports[""] == 14
    assert ir.to_proto(out).SerializeToString() == ir.to_proto(model).SerializeToString()
