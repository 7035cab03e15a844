"""fuse_conv_affine: Conv + per-channel constant Add/Mul fold into the Conv (exact op list,
parity, checker, idempotence); constants that do not broadcast per channel, non-constants and
shared Conv outputs stay."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from graph_passes.fusions.conv_affine import FuseConvAffine
from graph_passes.testing.helpers import apply_pass, assert_parity, check, op_list

RTOL, ATOL = 1e-4, 1e-5
C = 4


def affine_model(
    op: str,
    const_shape: tuple[int, ...],
    *,
    conv_op: str = "Conv",
    bias: bool = True,
    const_first: bool = False,
    const_as_input: bool = False,
    dtype=np.float32,
    extra_nodes: tuple = (),
    extra_outputs: tuple = (),
) -> ir.Model:
    """x [2, 3, 5, 5] -> Conv -> c -> op(c, k) -> y; the Conv output is [2, 4, 5, 5]."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if conv_op == "Conv":
        w = rng.standard_normal((C, 3, 3, 3))
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    else:
        w = rng.standard_normal((3, C, 3, 3))
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    inits = [numpy_helper.from_array((w * 0.3).astype(dtype), "W")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(C).astype(dtype), "B"))
    k = numpy_helper.from_array(rng.uniform(0.5, 1.5, const_shape).astype(dtype), "k")
    inputs = [helper.make_tensor_value_info("x", elem, [2, 3, 5, 5])]
    if const_as_input:
        inputs.append(helper.make_tensor_value_info("k", elem, list(const_shape)))
    else:
        inits.append(k)
    nodes = [
        helper.make_node(
            conv_op, ["x", "W", "B"] if bias else ["x", "W"], ["c"], name="conv", **attrs
        ),
        helper.make_node(op, ["k", "c"] if const_first else ["c", "k"], ["y"], name="affine"),
        *extra_nodes,
    ]
    rank = max(4, len(const_shape))
    outputs = [helper.make_tensor_value_info("y", elem, [f"d{i}" for i in range(rank)])]
    outputs += [helper.make_tensor_value_info(n, elem, s) for n, s in extra_outputs]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    return ir.from_proto(proto)


def run(model: ir.Model, rtol: float = RTOL, atol: float = ATOL) -> tuple[ir.Model, bool]:
    candidate, result = apply_pass(FuseConvAffine(), model)
    check(candidate)
    assert_parity(model, candidate, rtol=rtol, atol=atol, seed=0)
    assert not FuseConvAffine()(candidate.clone()).modified, "second run must find nothing"
    return candidate, result.modified


FIRE = {
    "add_c11": ("Add", (C, 1, 1), {}),
    "add_1c11": ("Add", (1, C, 1, 1), {}),
    "add_const_first": ("Add", (C, 1, 1), {"const_first": True}),
    "add_without_bias": ("Add", (1, C, 1, 1), {"bias": False}),
    "add_scalar": ("Add", (), {}),
    "mul_c11": ("Mul", (C, 1, 1), {}),
    "mul_1c11_const_first": ("Mul", (1, C, 1, 1), {"const_first": True}),
    "mul_without_bias": ("Mul", (C, 1, 1), {"bias": False}),
    "mul_conv_transpose": ("Mul", (1, C, 1, 1), {"conv_op": "ConvTranspose"}),
    "add_conv_transpose": ("Add", (C, 1, 1), {"conv_op": "ConvTranspose"}),
}


@pytest.mark.parametrize(("op", "shape", "kwargs"), FIRE.values(), ids=FIRE.keys())
def test_affine_is_folded(op, shape, kwargs):
    model = affine_model(op, shape, **kwargs)
    out, modified = run(model)
    conv_op = kwargs.get("conv_op", "Conv")
    assert modified and op_list(out) == [conv_op]
    (y,) = out.graph.outputs
    assert y.name == "y" and y.producer().op_type == conv_op
    assert out.graph.initializers["W"].const_value.numpy().shape == (
        model.graph.initializers["W"].const_value.numpy().shape
    )


def test_fp16_weights_keep_their_dtype():
    out, modified = run(affine_model("Mul", (C, 1, 1), dtype=np.float16), rtol=1e-2, atol=1e-2)
    assert modified and op_list(out) == ["Conv"]
    assert out.graph.node(0).inputs[1].const_value.dtype == ir.DataType.FLOAT16


def test_chain_of_mul_then_add_folds_both():
    add = helper.make_node("Add", ["y", "k"], ["z"], name="add")
    model = affine_model("Mul", (C, 1, 1), extra_nodes=(add,), extra_outputs=(("z", [2, C, 5, 5]),))
    # y feeds z and is a graph output: only the Mul folds (y keeps its name, z stays an Add).
    out, modified = run(model)
    assert modified and op_list(out) == ["Conv", "Add"]


KEEP = {
    "vector_broadcasts_along_width": ("Add", (5,), {}),  # a 1-D constant aligns with W
    "full_spatial": ("Add", (C, 5, 5), {}),
    "batch_axis": ("Mul", (2, C, 1, 1), {}),
    "rank_too_high": ("Add", (1, 1, C, 1, 1), {}),
    "not_constant": ("Mul", (C, 1, 1), {"const_as_input": True}),
    "conv_output_used_twice": (
        "Add",
        (C, 1, 1),
        {
            "extra_nodes": (helper.make_node("Relu", ["c"], ["r"], name="r"),),
            "extra_outputs": (("r", [2, C, 5, 5]),),
        },
    ),
    "conv_output_is_graph_output": ("Add", (C, 1, 1), {"extra_outputs": (("c", [2, C, 5, 5]),)}),
}


@pytest.mark.parametrize(("op", "shape", "kwargs"), KEEP.values(), ids=KEEP.keys())
def test_near_miss_is_kept(op, shape, kwargs):
    model = affine_model(op, shape, **kwargs)
    candidate, result = apply_pass(FuseConvAffine(), model)
    assert not result.modified and op_list(candidate) == op_list(model)
    check(candidate)
