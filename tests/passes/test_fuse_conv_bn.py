"""fuse_conv_bn: Conv/ConvTranspose/Gemm/2-D MatMul + inference BatchNormalization become one
node (exact op list, parity, checker, idempotence), and near misses (training BN, shared or
non-constant parameters, mismatched channels, a Conv output with two uses, a rank-3 MatMul)
stay as they were."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.fusions.conv_bn import FuseConvBatchNorm
from graph_passes.testing.helpers import apply_pass, assert_parity, check, op_list
from models.kinds import old_zoo_cnn

RTOL, ATOL = 1e-4, 1e-5


def bn_model(
    *,
    op: str = "Conv",
    channels: int = 4,
    bn_channels: int | None = None,
    group: int = 1,
    bias: bool = True,
    dtype=np.float32,
    opset: int = 17,
    ir_version: int = 8,
    bn_attrs: dict | None = None,
    bn_outputs: tuple[str, ...] = ("y",),
    params_as_inputs: bool = False,
    extra_nodes: tuple = (),
    extra_outputs: tuple = (),
    y_is_output: bool = True,
) -> ir.Model:
    """x [2, 6, 5, 5] -> op -> c -> BatchNormalization -> y (-> Relu -> z when not an output)."""
    rng = np.random.default_rng(0)
    c_in = 6
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if op == "Conv":
        w = rng.standard_normal((channels, c_in // group, 3, 3))
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": group}
        x_shape, y_shape = [2, c_in, 5, 5], [2, channels, 5, 5]
    elif op == "ConvTranspose":
        w = rng.standard_normal((c_in, channels // group, 3, 3))
        attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "group": group}
        x_shape, y_shape = [2, c_in, 5, 5], [2, channels, 11, 11]
    else:  # Gemm, transB = 1
        w = rng.standard_normal((channels, c_in))
        attrs = {"transB": 1, "alpha": 0.5, "beta": 2.0}
        x_shape, y_shape = [3, c_in], [3, channels]
    n = bn_channels or channels
    inits = [numpy_helper.from_array((w * 0.3).astype(dtype), "W")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(channels).astype(dtype), "B"))
    inits += [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, n).astype(dtype), "gamma"),
        numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(dtype), "beta"),
        numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(dtype), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, n).astype(dtype), "var"),
    ]
    nodes = [
        helper.make_node(op, ["x", "W", "B"] if bias else ["x", "W"], ["c"], name="conv", **attrs),
        helper.make_node(
            "BatchNormalization",
            ["c", "gamma", "beta", "mean", "var"],
            list(bn_outputs),
            name="bn",
            **(bn_attrs or {}),
        ),
    ]
    outputs = []
    if y_is_output:
        outputs.append(helper.make_tensor_value_info("y", elem, y_shape))
    else:
        nodes.append(helper.make_node("Relu", ["y"], ["z"], name="relu"))
        outputs.append(helper.make_tensor_value_info("z", elem, y_shape))
    nodes += list(extra_nodes)
    outputs += [helper.make_tensor_value_info(name, elem, shape) for name, shape in extra_outputs]
    inputs = [helper.make_tensor_value_info("x", elem, x_shape)]
    if params_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=ir_version,
    )
    return ir.from_proto(proto)


def run(model: ir.Model, rtol: float = RTOL, atol: float = ATOL) -> tuple[ir.Model, bool]:
    candidate, result = apply_pass(FuseConvBatchNorm(), model)
    check(candidate)
    assert_parity(model, candidate, rtol=rtol, atol=atol, seed=0)
    again = FuseConvBatchNorm()
    assert not again(candidate.clone()).modified, "second run must find nothing"
    return candidate, result.modified


FIRE = {
    "conv_with_bias": ({}, ["Conv"]),
    "conv_without_bias": ({"bias": False}, ["Conv"]),
    "conv_grouped": ({"channels": 6, "group": 3}, ["Conv"]),
    "conv_then_relu": ({"y_is_output": False}, ["Conv", "Relu"]),
    "conv_epsilon_attr": ({"bn_attrs": {"epsilon": 0.5}}, ["Conv"]),
    "conv_opset14_training_mode_0": ({"opset": 14, "bn_attrs": {"training_mode": 0}}, ["Conv"]),
    "conv_opset9_ir4": ({"opset": 9, "ir_version": 4}, ["Conv"]),
    "conv_transpose": ({"op": "ConvTranspose"}, ["ConvTranspose"]),
    "conv_transpose_grouped": ({"op": "ConvTranspose", "group": 2}, ["ConvTranspose"]),
    "gemm": ({"op": "Gemm"}, ["Gemm"]),
    "gemm_without_bias": ({"op": "Gemm", "bias": False}, ["Gemm"]),
}


@pytest.mark.parametrize(("kwargs", "ops"), FIRE.values(), ids=FIRE.keys())
def test_bn_is_folded(kwargs, ops):
    model = bn_model(**kwargs)
    out, modified = run(model)
    assert modified and op_list(out) == ops
    assert [v.name for v in out.graph.outputs] == [v.name for v in model.graph.outputs]
    assert out.graph.outputs[0].shape == model.graph.outputs[0].shape
    node = out.graph.node(0)
    assert node.inputs[1].name != "W" and len(node.inputs) == 3


def test_graph_output_keeps_its_name_and_producer():
    out, modified = run(bn_model())
    assert modified
    (y,) = out.graph.outputs
    assert y.name == "y" and y.producer().op_type == "Conv"


def test_opset9_spatial_attribute_old_zoo_style():
    # Opset 7 BN had ``spatial``; spatial = 1 is the ordinary per-channel form.
    out, modified = run(bn_model(opset=7, ir_version=4, bn_attrs={"spatial": 1}))
    assert modified and op_list(out) == ["Conv"]
    # spatial = 0 (per-element parameters) is never folded.
    _, result = apply_pass(FuseConvBatchNorm(), bn_model(opset=7, bn_attrs={"spatial": 0}))
    assert not result.modified


def test_fp16_weights_keep_their_dtype():
    out, modified = run(bn_model(dtype=np.float16), rtol=1e-2, atol=1e-2)
    assert modified and op_list(out) == ["Conv"]
    node = out.graph.node(0)
    assert node.inputs[1].const_value.dtype == ir.DataType.FLOAT16
    assert node.inputs[2].const_value.dtype == ir.DataType.FLOAT16


def test_shared_weight_is_not_mutated():
    shared = helper.make_node(
        "Conv", ["x", "W"], ["other"], name="other_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
    )
    model = bn_model(extra_nodes=(shared,), extra_outputs=(("other", [2, 4, 5, 5]),))
    before = model.graph.initializers["W"].const_value.numpy().copy()
    out, modified = run(model)
    assert modified and sorted(op_list(out)) == ["Conv", "Conv"]
    np.testing.assert_array_equal(out.graph.initializers["W"].const_value.numpy(), before)
    assert out.graph.node("other_conv").inputs[1].name == "W"


KEEP = {
    "params_are_graph_inputs": {"params_as_inputs": True},
    "channel_mismatch": {"bn_channels": 3, "channels": 4},
    "opset9_training_outputs": {
        "opset": 9,
        "bn_outputs": ("y", "m", "v", "sm", "sv"),
    },
    "opset14_training_mode_1": {
        "opset": 14,
        "bn_attrs": {"training_mode": 1},
        "bn_outputs": ("y", "m", "v"),
        "extra_outputs": (("m", [4]), ("v", [4])),
    },
    "conv_output_used_twice": {
        "extra_nodes": (helper.make_node("Relu", ["c"], ["r"], name="r"),),
        "extra_outputs": (("r", [2, 4, 5, 5]),),
    },
    "conv_output_is_graph_output": {"extra_outputs": (("c", [2, 4, 5, 5]),)},
}


@pytest.mark.parametrize("kwargs", KEEP.values(), ids=KEEP.keys())
def test_near_miss_is_kept(kwargs):
    model = bn_model(**kwargs)
    candidate, result = apply_pass(FuseConvBatchNorm(), model)
    assert not result.modified and op_list(candidate) == op_list(model)
    if "bn_channels" not in kwargs:  # a channel mismatch is not a valid model to start with
        check(candidate)


def test_training_mode_bn_in_opset14_with_unused_outputs_is_kept():
    model = bn_model(opset=14, bn_attrs={"training_mode": 1}, bn_outputs=("y", "m", "v"))
    _, result = apply_pass(FuseConvBatchNorm(), model)
    assert not result.modified


def test_old_zoo_cnn_weights_are_graph_inputs_so_nothing_fires():
    model = ir.from_proto(old_zoo_cnn())
    candidate, result = apply_pass(FuseConvBatchNorm(), model)
    assert not result.modified
    assert op_list(candidate).count("BatchNormalization") == 2


def test_old_zoo_cnn_without_weight_inputs_folds_both_bns():
    proto = old_zoo_cnn()
    names = {t.name for t in proto.graph.initializer}
    kept = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.ir_version = 4
    onnx.checker.check_model(proto)
    model = ir.from_proto(proto)
    candidate, result = apply_pass(FuseConvBatchNorm(), model)
    assert result.modified
    assert "BatchNormalization" not in op_list(candidate)
    check(candidate)
    assert_parity(model, candidate, rtol=RTOL, atol=ATOL, seed=0)


def test_builder_makes_float_conv_bn():  # guard: the builder makes what the tests think
    model = bn_model()
    assert model.graph.inputs[0].dtype == ir.DataType(TensorProto.FLOAT)
    assert op_list(model) == ["Conv", "BatchNormalization"]


def matmul_bn_model(
    x_shape, *, w_as_input: bool = False, c_shape=None, hide_rank: bool = False
) -> ir.Model:
    """x -> [Relu, no shape info ->] MatMul(x, W [6, 4]) -> c -> BatchNormalization -> y
    (BN's channels: axis 1 of c)."""
    rng = np.random.default_rng(0)
    out_shape = [*x_shape[:-1], 4]
    n = out_shape[1]
    w = numpy_helper.from_array((rng.standard_normal((6, 4)) * 0.3).astype("f"), "W")
    params = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, n).astype("f"), "gamma"),
        numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype("f"), "beta"),
        numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype("f"), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, n).astype("f"), "var"),
    ]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")] if hide_rank else []
    nodes += [
        helper.make_node("MatMul", ["r" if hide_rank else "x", "W"], ["c"], name="mm"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    inits = params
    if w_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [6, 4]))
    else:
        inits = [w, *params]
    out_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    value_info = [helper.make_tensor_value_info("c", TensorProto.FLOAT, c_shape)] if c_shape else []
    proto = helper.make_model(
        helper.make_graph(nodes, "g", inputs, [out_info], inits, value_info=value_info),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    return ir.from_proto(proto)


def test_matmul_2d_bn_becomes_gemm():
    out, modified = run(matmul_bn_model([3, 6]))
    assert modified and op_list(out) == ["Gemm"]
    gemm = out.graph.node(0)
    assert gemm.inputs[1].name != "W" and len(gemm.inputs) == 3
    assert gemm.attributes.get_int("transB", 0) == 0 and gemm.attributes.get_float("beta") == 1


def test_matmul_with_unknown_input_rank_but_2d_output_shape_fires():
    out, modified = run(matmul_bn_model([3, 6], hide_rank=True, c_shape=["m", 4]))
    assert modified and op_list(out) == ["Relu", "Gemm"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"x_shape": [2, 4, 6]},  # BN's axis 1 has N = 4 entries too: only the rank tells
        {"x_shape": [3, 6], "hide_rank": True},
        {"x_shape": [3, 6], "w_as_input": True},
    ],
    ids=["rank_3_bn_normalizes_sequence", "rank_unknown", "weight_not_constant"],
)
def test_matmul_bn_near_miss_is_kept(kwargs):
    model = matmul_bn_model(**kwargs)
    candidate, result = apply_pass(FuseConvBatchNorm(), model)
    assert not result.modified and op_list(candidate) == op_list(model)
    assert op_list(candidate)[-2:] == ["MatMul", "BatchNormalization"]
    check(candidate)
