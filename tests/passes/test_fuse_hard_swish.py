"""fuse_hard_swish: hand-written hard-swish and hard-sigmoid become HardSwish/HardSigmoid
(exact op list, attributes, parity, checker, idempotence); wrong constants, non-constant
constants, HardSigmoid with other parameters, shared intermediates, a different x and a
broadcasting constant stay."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fusions.hard_swish import FuseHardSwish
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

INITS = (
    "float three = {3.0}, float zero = {0.0}, float six = {6.0}, "
    "float sixth = {0.16666667}, float five = {5.0}, float[1, 1, 1, 1] three4 = {3.0}, "
    "float[1, 1, 1, 1, 1] three5 = {3.0}, float fsixth = {0.1666}"
)


def model(body: str, *, opset: int = 17, outputs: str = "y", extra_inputs: str = "") -> ir.Model:
    """x [2, 3, 4, 5] -> body -> y."""
    outs = ", ".join(f"float[2, 3, 4, 5] {o}" for o in outputs.split(", "))
    ins = "float[2, 3, 4, 5] x" + extra_inputs
    return model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g ({ins}) => ({outs}) <{INITS}> {{
            {body}
        }}
        """
    )


def feeds(m: ir.Model) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    sets = []
    for _ in range(2):
        feed = {"x": (rng.standard_normal((2, 3, 4, 5)) * 4).astype(np.float32)}
        for v in m.graph.inputs[1:]:
            feed[v.name] = np.array(3.0, np.float32)
        sets.append(feed)
    return sets


def run(m: ir.Model) -> tuple[ir.Model, bool]:
    candidate, result = apply_pass(FuseHardSwish(), m)
    check(candidate)
    assert_parity(m, candidate, feeds(m), rtol=1e-5, atol=1e-6)
    assert not FuseHardSwish()(candidate.clone()).modified, "second run must find nothing"
    return candidate, result.modified


RELU6 = "a = Add(x, three)\nc = Clip(a, zero, six)\n"
FIRE = {
    "div_six": (RELU6 + "m = Mul(x, c)\ny = Div(m, six)", 17, ["HardSwish"]),
    "mul_sixth_swapped": (
        "a = Add(three, x)\nc = Clip(a, zero, six)\nm = Mul(c, x)\ny = Mul(sixth, m)",
        17,
        ["HardSwish"],
    ),
    "x_times_clip_over_six": (RELU6 + "h = Div(c, six)\ny = Mul(x, h)", 17, ["HardSwish"]),
    "x_times_hard_sigmoid": (
        "h = HardSigmoid<alpha = 0.16666667, beta = 0.5>(x)\ny = Mul(h, x)",
        17,
        ["HardSwish"],
    ),
    "rank_4_constant": (
        "a = Add(x, three4)\nc = Clip(a, zero, six)\nm = Mul(x, c)\ny = Div(m, six)",
        17,
        ["HardSwish"],
    ),
    "hard_sigmoid_div": (RELU6 + "y = Div(c, six)", 17, ["HardSigmoid"]),
    "hard_sigmoid_mul": (RELU6 + "y = Mul(c, sixth)", 17, ["HardSigmoid"]),
    "opset_13_div": (RELU6 + "h = Div(c, six)\ny = Mul(x, h)", 13, ["HardSigmoid", "Mul"]),
    "opset_10_clip_attributes": (
        "a = Add(x, three)\nc = Clip<min = 0.0, max = 6.0>(a)\ny = Div(c, six)",
        10,
        ["HardSigmoid"],
    ),
}


@pytest.mark.parametrize(("body", "opset", "ops"), FIRE.values(), ids=FIRE.keys())
def test_pattern_is_fused(body, opset, ops):
    out, modified = run(model(body, opset=opset))
    assert modified and op_list(out) == ops
    assert out.graph.outputs[0].name == "y"
    for node in out.graph:
        if node.op_type == "HardSigmoid":
            assert node.attributes.get_float("alpha") == pytest.approx(1 / 6)
            assert node.attributes.get_float("beta") == 0.5
        if node.op_type in ("HardSwish", "HardSigmoid"):
            assert node.inputs[0].name == "x"


KEEP = {
    "add_five": "a = Add(x, five)\nc = Clip(a, zero, six)\nm = Mul(x, c)\ny = Div(m, six)",
    "div_five": RELU6 + "m = Mul(x, c)\ny = Div(m, five)",
    "sixth_too_far_off": RELU6 + "y = Mul(c, fsixth)",
    "clip_max_five": "a = Add(x, three)\nc = Clip(a, zero, five)\ny = Div(c, six)",
    "keras_hard_sigmoid": "h = HardSigmoid<alpha = 0.2, beta = 0.5>(x)\ny = Mul(h, x)",
    "hard_sigmoid_of_other": "n = Neg(x)\nh = HardSigmoid<alpha = 0.16666667, beta = 0.5>(n)\n"
    "y = Mul(h, x)",
    "mul_other_value": RELU6 + "n = Neg(x)\nm = Mul(n, c)\ny = Div(m, six)",
    "constant_broadcasts_rank": (
        "a = Add(x, three5)\nc = Clip(a, zero, six)\nm = Mul(x, c)\nz = Div(m, six)\n"
        "y = Squeeze(z, zero_axis)"
    ),
    "six_is_not_constant": RELU6 + "y = Div(c, s_in)",
}


@pytest.mark.parametrize("body", KEEP.values(), ids=KEEP.keys())
def test_near_miss_is_kept(body):
    extra = ", float s_in" if "s_in" in body else ""
    if "zero_axis" in body:
        body = "zero_axis = Constant<value = int64[1] {0}>()\n" + body
    m = model(body, extra_inputs=extra)
    candidate, result = apply_pass(FuseHardSwish(), m)
    assert not result.modified and op_list(candidate) == op_list(m)
    check(candidate)


def test_clip_that_is_a_graph_output_is_kept():
    # c feeds the hard-swish and is a graph output: nothing may be removed, nothing fused.
    m = model(RELU6 + "m = Mul(x, c)\ny = Div(m, six)", outputs="y, c")
    candidate, result = apply_pass(FuseHardSwish(), m)
    assert not result.modified and op_list(candidate) == op_list(m)
