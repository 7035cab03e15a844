"""fuse_activation_chains: Relu/Clip chains merge into one Relu or Clip with the intersected
range (exact op list and bounds, parity, checker, idempotence); disjoint ranges, non-constant
bounds and shared or exported intermediate values stay."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fusions.activation_chains import FuseActivationChains, clip_range
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list

INITS = (
    "float zero = {0.0}, float six = {6.0}, float m1 = {-1.0}, float m2 = {-2.0}, "
    "float five = {5.0}, float eight = {8.0}, float one = {1.0}, float two = {2.0}, "
    "float three = {3.0}"
)

FP16_BITS = {
    n: int(np.array(v, np.float16).view(np.uint16))
    for n, v in {"zero": 0, "six": 6, "m1": -1, "m2": -2, "five": 5, "eight": 8}.items()
}


def chain(body: str, *, opset: int = 17, dtype: str = "float", outputs: str = "y") -> ir.Model:
    """x [2, 3, 4] -> body -> y."""
    outs = ", ".join(f"{dtype}[2, 3, 4] {o}" for o in outputs.split(", "))
    inits = INITS if opset >= 11 else ""
    if dtype == "float16":  # the text parser cannot write float16 literals
        inits = ", ".join(f"float16 {n} = {{{v}}}" for n, v in FP16_BITS.items())
    return model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g ({dtype}[2, 3, 4] x, {dtype} lo_in) => ({outs}) <{inits}> {{
            {body}
        }}
        """
        if "lo_in" in body
        else f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g ({dtype}[2, 3, 4] x) => ({outs}) <{inits}> {{
            {body}
        }}
        """
    )


def feeds(model: ir.Model, dtype=np.float32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    sets = []
    for _ in range(2):
        feed = {"x": (rng.standard_normal((2, 3, 4)) * 5).astype(dtype)}
        if any(v.name == "lo_in" for v in model.graph.inputs):
            feed["lo_in"] = np.array(-0.5, dtype)
        sets.append(feed)
    return sets


def run(model: ir.Model, dtype=np.float32, tol: float = 0.0) -> tuple[ir.Model, bool]:
    candidate, result = apply_pass(FuseActivationChains(), model)
    check(candidate)
    assert_parity(model, candidate, feeds(model, dtype), rtol=0.0, atol=tol)
    assert not FuseActivationChains()(candidate.clone()).modified, "second run must find nothing"
    return candidate, result.modified


def final_range(model: ir.Model) -> tuple[float, float]:
    opset = model.opset_imports[""]
    lo, hi, _ = clip_range(model.graph.outputs[0].producer(), opset)
    return lo, hi


INF = float("inf")
FIRE = {
    "relu_relu": ("m = Relu(x)\ny = Relu(m)", 17, ["Relu"], (0.0, INF)),
    "relu_clip_0_6": ("m = Relu(x)\ny = Clip(m, zero, six)", 17, ["Clip"], (0.0, 6.0)),
    "relu_clip_negative_min": ("m = Relu(x)\ny = Clip(m, m1, six)", 17, ["Clip"], (0.0, 6.0)),
    "clip_clip": ("m = Clip(x, m2, five)\ny = Clip(m, m1, eight)", 17, ["Clip"], (-1.0, 5.0)),
    "clip_relu": ("m = Clip(x, m2, five)\ny = Relu(m)", 17, ["Clip"], (0.0, 5.0)),
    "clip_without_max_relu": ("m = Clip(x, m1)\ny = Relu(m)", 17, ["Relu"], (0.0, INF)),
    "clip_max_only_then_min_only": (
        'm = Clip(x, "", five)\ny = Clip(m, m1)',
        17,
        ["Clip"],
        (-1.0, 5.0),
    ),
    "three_in_a_row": (
        "a = Relu(x)\nb = Clip(a, m1, eight)\ny = Clip(b, one, six)",
        17,
        ["Clip"],
        (1.0, 6.0),
    ),
    "opset_10_attributes": (
        "m = Relu(x)\ny = Clip<min = -1.0, max = 6.0>(m)",
        10,
        ["Clip"],
        (0.0, 6.0),
    ),
    "opset_10_clip_clip": (
        "m = Clip<min = -2.0>(x)\ny = Clip<max = 3.0>(m)",
        10,
        ["Clip"],
        (-2.0, 3.0),
    ),
    "opset_6_relu_relu": ("m = Relu(x)\ny = Relu(m)", 6, ["Relu"], (0.0, INF)),
}


@pytest.mark.parametrize(("body", "opset", "ops", "bounds"), FIRE.values(), ids=FIRE.keys())
def test_chain_is_merged(body, opset, ops, bounds):
    out, modified = run(chain(body, opset=opset))
    assert modified and op_list(out) == ops
    assert final_range(out) == bounds
    assert out.graph.outputs[0].name == "y"


def test_float16_bounds_keep_their_dtype():
    out, modified = run(chain("m = Relu(x)\ny = Clip(m, m1, six)", dtype="float16"), np.float16)
    assert modified and op_list(out) == ["Clip"] and final_range(out) == (0.0, 6.0)
    assert [v.const_value.dtype for v in out.graph.node(0).inputs[1:]] == [ir.DataType.FLOAT16] * 2


def test_merge_feeds_a_later_node():
    model = chain("m = Relu(x)\nc = Clip(m, zero, six)\ny = Mul(c, two)")
    out, modified = run(model)
    assert modified and op_list(out) == ["Clip", "Mul"]


KEEP = {
    "disjoint_ranges": "m = Clip(x, zero, one)\ny = Clip(m, two, three)",
    "bound_not_constant": "m = Relu(x)\ny = Clip(m, lo_in, six)",
    "other_activation": "m = Relu(x)\ny = Sigmoid(m)",
    "leaky_relu": "m = LeakyRelu(x)\ny = Relu(m)",
}


@pytest.mark.parametrize("body", KEEP.values(), ids=KEEP.keys())
def test_near_miss_is_kept(body):
    model = chain(body)
    candidate, result = apply_pass(FuseActivationChains(), model)
    assert not result.modified and op_list(candidate) == op_list(model)
    check(candidate)


@pytest.mark.parametrize("outputs", ["y, m", "y, z"], ids=["mid_is_output", "mid_used_twice"])
def test_shared_intermediate_is_kept(outputs):
    body = (
        "m = Relu(x)\ny = Clip(m, zero, six)\nz = Neg(m)"
        if "z" in outputs
        else ("m = Relu(x)\ny = Clip(m, zero, six)")
    )
    model = chain(body, outputs=outputs)
    candidate, result = apply_pass(FuseActivationChains(), model)
    assert not result.modified and op_list(candidate) == op_list(model)
    check(candidate)
