"""fuse_pad_conv: a constant zero Pad folds into a following Conv or AveragePool
(count_include_pad=1) as wider pads (exact op list, parity, checker, idempotence); reflect
mode, non-zero values, padded batch/channel axes, negative pads, auto_pad, MaxPool,
count_include_pad=0 and shared Pad outputs stay."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from graph_passes.fusions.pad_conv import FusePadConv
from graph_passes.testing.helpers import apply_pass, assert_parity, check, op_list

RTOL, ATOL = 1e-5, 1e-5


def pad_model(
    pads: list[int],
    *,
    opset: int = 17,
    op: str = "Conv",
    op_attrs: dict | None = None,
    mode: str = "constant",
    value: float | None = None,
    axes: list[int] | None = None,
    pads_as_input: bool = False,
    extra_nodes: tuple = (),
    extra_outputs: tuple = (),
) -> ir.Model:
    """x [2, 3, 7, 6] -> Pad -> p -> op -> y."""
    rng = np.random.default_rng(0)
    inits, inputs = [], [helper.make_tensor_value_info("x", 1, [2, 3, 7, 6])]
    attrs = dict(op_attrs or {})
    if op == "Conv":
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 3, 3, 2)).astype("f"), "W"))
        inits.append(numpy_helper.from_array(rng.standard_normal(4).astype("f"), "B"))
        op_node = helper.make_node("Conv", ["p", "W", "B"], ["y"], name="op", **attrs)
    else:
        attrs.setdefault("kernel_shape", [3, 2])
        op_node = helper.make_node(op, ["p"], ["y"], name="op", **attrs)
    if opset < 11:
        pad_attrs = {"pads": pads, "mode": mode}
        if value is not None:
            pad_attrs["value"] = value
        pad = helper.make_node("Pad", ["x"], ["p"], name="pad", **pad_attrs)
    else:
        names = ["x", "pads"]
        if pads_as_input:
            inputs.append(helper.make_tensor_value_info("pads", 7, [len(pads)]))
        else:
            inits.append(numpy_helper.from_array(np.array(pads, np.int64), "pads"))
        if value is not None or axes is not None:
            names.append("" if value is None else "value")
            if value is not None:
                inits.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
        if axes is not None:
            names.append("axes")
            inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
        pad = helper.make_node("Pad", names, ["p"], name="pad", mode=mode)
    outputs = [helper.make_tensor_value_info("y", 1, ["n", "c", "h", "w"])]
    outputs += [helper.make_tensor_value_info(n, 1, ["n", "c", "h", "w"]) for n in extra_outputs]
    proto = helper.make_model(
        helper.make_graph([pad, op_node, *extra_nodes], "g", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=8,
    )
    return ir.from_proto(proto)


def run(model: ir.Model, feeds=None) -> tuple[ir.Model, bool]:
    candidate, result = apply_pass(FusePadConv(), model)
    check(candidate)
    assert_parity(model, candidate, feeds, rtol=RTOL, atol=ATOL, seed=0)
    assert not FusePadConv()(candidate.clone()).modified, "second run must find nothing"
    return candidate, result.modified


SPATIAL = [0, 0, 1, 2, 0, 0, 3, 0]  # top 1, left 2, bottom 3, right 0

FIRE = {
    "conv": (SPATIAL, {}, [1, 2, 3, 0]),
    "conv_adds_to_existing_pads": (
        SPATIAL,
        {"op_attrs": {"pads": [1, 1, 1, 1], "strides": [2, 1], "dilations": [1, 2]}},
        [2, 3, 4, 1],
    ),
    "explicit_zero_value": (SPATIAL, {"value": 0.0}, [1, 2, 3, 0]),
    "opset_10_attributes": (SPATIAL, {"opset": 10, "value": 0.0}, [1, 2, 3, 0]),
    "opset_18_axes": ([1, 2, 3, 0], {"opset": 18, "axes": [2, -1]}, [1, 2, 3, 0]),
    "average_pool_count_include_pad": (
        SPATIAL,
        {
            "op": "AveragePool",
            "op_attrs": {"count_include_pad": 1, "pads": [0, 1, 0, 1], "kernel_shape": [4, 4]},
        },
        [1, 3, 3, 1],
    ),
}


@pytest.mark.parametrize(("pads", "kwargs", "expected"), FIRE.values(), ids=FIRE.keys())
def test_pad_is_folded(pads, kwargs, expected):
    model = pad_model(pads, **kwargs)
    out, modified = run(model)
    op = kwargs.get("op", "Conv")
    assert modified and op_list(out) == [op]
    node = out.graph.node(0)
    assert list(node.attributes.get_ints("pads")) == expected
    assert node.inputs[0].name == "x"


def test_chain_pad_conv_pad_conv():
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype("f"), "W1"),
        numpy_helper.from_array(rng.standard_normal((2, 4, 3, 3)).astype("f"), "W2"),
        numpy_helper.from_array(np.array(SPATIAL, np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p1"], name="pad1"),
        helper.make_node("Conv", ["p1", "W1"], ["c1"], name="conv1"),
        helper.make_node("Pad", ["c1", "pads"], ["p2"], name="pad2"),
        helper.make_node("Conv", ["p2", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    proto = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
            [helper.make_tensor_value_info("y", 1, ["n", "c", "h", "w"])],
            inits,
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    out, modified = run(ir.from_proto(proto))
    assert modified and op_list(out) == ["Conv", "Conv"]
    assert [list(n.attributes.get_ints("pads")) for n in out.graph] == [[1, 2, 3, 0], [2, 3, 4, 1]]


KEEP = {
    "reflect_mode": (SPATIAL, {"mode": "reflect"}),
    "non_zero_value": (SPATIAL, {"value": 0.5}),
    "opset_10_non_zero_value": (SPATIAL, {"opset": 10, "value": -1.0}),
    "pads_channel_axis": ([0, 1, 1, 1, 0, 0, 1, 1], {}),
    "negative_pads_crop": ([0, 0, 1, -1, 0, 0, 1, 1], {}),
    "pads_not_constant": (SPATIAL, {"pads_as_input": True}),
    "auto_pad_same": (SPATIAL, {"op_attrs": {"auto_pad": "SAME_UPPER"}}),
    "average_pool_excludes_pad": (SPATIAL, {"op": "AveragePool"}),
    "average_pool_ceil_mode": (
        SPATIAL,
        {"op": "AveragePool", "op_attrs": {"count_include_pad": 1, "ceil_mode": 1}},
    ),
    "average_pool_pad_reaches_kernel": (
        SPATIAL,
        {"op": "AveragePool", "op_attrs": {"count_include_pad": 1, "kernel_shape": [3, 3]}},
    ),
    "max_pool": (SPATIAL, {"op": "MaxPool"}),
    "pad_output_used_twice": (
        SPATIAL,
        {
            "extra_nodes": (helper.make_node("Relu", ["p"], ["r"], name="r"),),
            "extra_outputs": ("r",),
        },
    ),
    "pad_output_is_graph_output": (SPATIAL, {"extra_outputs": ("p",)}),
}


@pytest.mark.parametrize(("pads", "kwargs"), KEEP.values(), ids=KEEP.keys())
def test_near_miss_is_kept(pads, kwargs):
    model = pad_model(pads, **kwargs)
    candidate, result = apply_pass(FusePadConv(), model)
    assert not result.modified and op_list(candidate) == op_list(model)
    assert "Pad" in op_list(candidate)
    check(candidate)
