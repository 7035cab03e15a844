"""SmoothQuant on normalization outputs (pipeline/quantization/smooth.py): exact in float,
applied only where every reader of the activation is a weight it can rescale, and it buys
int8 accuracy when one activation channel is an outlier."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.quantization import guard, smooth
from pipeline.quantization.stage import QuantizeOptions, quantize_model

RNG = np.random.default_rng(3)
WIDTH = 64


def norm_model(path, outlier: float = 40.0):
    """x -> LayerNorm (gamma with one outlier channel) -> MatMul w1 ; + residual -> MatMul w2."""
    gamma = np.ones(WIDTH, np.float32)
    gamma[7] = outlier
    tensors = {
        "gamma": gamma,
        "beta": np.zeros(WIDTH, np.float32),
        "w1": (RNG.standard_normal((WIDTH, 48)) * 0.2).astype(np.float32),
        "w2": (RNG.standard_normal((48, 16)) * 0.2).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        helper.make_node("ReduceMean", ["n"], ["residual"], name="res", keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", WIDTH])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 16]),
            helper.make_tensor_value_info("residual", TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(v, k) for k, v in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _feeds(count=4):
    return [{"x": RNG.standard_normal((2, 5, WIDTH)).astype(np.float32)} for _ in range(count)]


def test_smoothing_is_exact_in_float_and_leaves_the_other_reader_alone(tmp_path):
    model = onnx.load(str(norm_model(tmp_path / "m.onnx")))
    smoothed, count = smooth.smooth(model, _feeds())
    assert count == 1
    ops = Counter(n.op_type for n in smoothed.graph.node)
    assert ops["Mul"] == 1 and ops["MatMul"] == 2
    readers = {n.name: list(n.input) for n in smoothed.graph.node}
    assert readers["mm1"][0] == "n_smoothed" and readers["res"][0] == "n"  # residual untouched
    feed = _feeds(1)[0]
    before = guard.run(guard.session(model), feed)
    after = guard.run(guard.session(smoothed), feed)
    for name in ("y", "residual"):
        np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-5)
    w1 = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}["w1"]
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}["w1"]
    assert np.abs(w1[7]).max() > 2 * np.abs(original[7]).max()  # the outlier row grew
    with pytest.raises(ValueError, match="alpha"):
        smooth.smooth(model, _feeds(), alpha=1.5)


def test_smoothing_buys_int8_accuracy_on_an_outlier_channel(tmp_path):
    src = norm_model(tmp_path / "m.onnx", outlier=200.0)
    data = tmp_path / "calib"
    data.mkdir()
    for index, feed in enumerate(_feeds(8)):
        np.savez(data / f"{index}.npz", **feed)
    drops = {}
    for alpha in (None, 0.5):
        result = quantize_model(
            src,
            tmp_path / f"q-{alpha}.onnx",
            QuantizeOptions(
                "int8-dynamic", max_drop=0.9, calibration=data, smooth_alpha=alpha, metric="cosine"
            ),
            reference_feeds=_feeds(2),
        )
        drops[alpha] = result.drop
        assert result.excluded_nodes == []
    assert any("SmoothQuant (alpha 0.5): 1 normalization" in n for n in result.notes)
    assert drops[0.5] < drops[None] / 2, drops
