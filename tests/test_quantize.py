"""Precision tiers on small models: each tier, the accuracy guard, and the preprocessing fixes.

Models are built with onnx.helper (weights from a fixed seed) so every case is small and its
expected outcome is known: which ops appear, which node is sensitive, which ORT call crashes
without our fix.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.quantization import guard, preprocess, tiers
from pipeline.quantization.isa import choose_int8_types
from pipeline.quantization.stage import QuantizeOptions, quantize_model
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
FLOAT_MIN = float(np.finfo(np.float32).min)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _weight(name: str, shape, scale: float = 0.1) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def mlp(path: Path, hidden: int = 64, opset: int = 17) -> Path:
    """x[batch, 64] -> MatMul -> Relu -> MatMul -> y[batch, 32] (K = 64 >= the int4 block)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [_weight("w1", (64, hidden)), _weight("w2", (hidden, 32))],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


def feeds(n: int = 3, batch: int = 4, width: int = 64, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, width)).astype(np.float32)} for _ in range(n)]


def ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def run(path: Path, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def test_int8_dynamic(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    result = quantize_model(
        src, tmp_path / "q.onnx", QuantizeOptions("int8-dynamic"), reference_feeds=feeds()
    )
    found = ops(tmp_path / "q.onnx")
    assert found["MatMul"] == 0 and found["DynamicQuantizeLinear"] == 2, found
    assert found["MatMulInteger"] == 2
    assert result.within_budget and result.accuracy["y"] > 0.99
    assert result.excluded_nodes == [] and result.quantized_nodes == 2
    assert run(tmp_path / "q.onnx", feeds(1)[0])[0].shape == (4, 32)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_static_each_method(tmp_path, method):
    src = mlp(tmp_path / "mlp.onnx")
    result = quantize_model(
        src,
        tmp_path / "q.onnx",
        QuantizeOptions("int8-static", calibration_method=method, cache_dir=tmp_path / "cache"),
        reference_feeds=feeds(),
        calibration_feeds=feeds(4, seed=7),
    )
    found = ops(tmp_path / "q.onnx")
    assert found["QuantizeLinear"] >= 2 and found["DequantizeLinear"] >= 4, found
    assert result.within_budget, result.summary
    assert result.accuracy["y"] > 0.98
    cached = list((tmp_path / "cache").glob(f"calibration-*-{method}-*.json"))
    assert len(cached) == 1
    # A second run with the same model and data reuses the cache instead of calibrating.
    again = quantize_model(
        src,
        tmp_path / "q2.onnx",
        QuantizeOptions("int8-static", calibration_method=method, cache_dir=tmp_path / "cache"),
        reference_feeds=feeds(),
        calibration_feeds=feeds(4, seed=7),
    )
    assert any("from cache" in n for n in again.notes)


def test_static_without_calibration_says_so_loudly(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    result = quantize_model(
        src, tmp_path / "q.onnx", QuantizeOptions("int8-static"), reference_feeds=feeds()
    )
    assert any("GENERATED" in n and "meaningless" not in n for n in result.notes)
    assert any("say nothing about real data" in n for n in result.notes)


def test_fp16_keeps_io_types_and_warns_on_cpu(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    result = quantize_model(
        src, tmp_path / "h.onnx", QuantizeOptions("fp16"), reference_feeds=feeds()
    )
    model = onnx.load(str(tmp_path / "h.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}
    assert any("SLOWER" in n for n in result.notes)
    assert result.accuracy["y"] > 0.9999


def test_remove_redundant_casts_only_lossless_pairs():
    nodes = [
        helper.make_node("Cast", ["a"], ["a32"], to=TensorProto.FLOAT, name="up"),
        helper.make_node("Cast", ["a32"], ["a16"], to=TensorProto.FLOAT16, name="down"),
        helper.make_node("Relu", ["a16"], ["b"], name="relu"),
        helper.make_node("Cast", ["b"], ["b32"], to=TensorProto.FLOAT, name="up2"),
        helper.make_node("Cast", ["b32"], ["b16"], to=TensorProto.FLOAT16, name="down2"),
        helper.make_node("Relu", ["b32"], ["c"], name="relu2"),  # b32 has 2 users: kept
        helper.make_node("Cast", ["c"], ["c16"], to=TensorProto.FLOAT16, name="lossy_down"),
        helper.make_node("Cast", ["c16"], ["c32"], to=TensorProto.FLOAT, name="lossy_up"),
        helper.make_node("Add", ["c32", "c32"], ["y"], name="add"),
        helper.make_node("Identity", ["b16"], ["z"], name="id"),
    ]
    graph = helper.make_graph(
        nodes,
        "casts",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT16, [3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert tiers.remove_redundant_casts(model.graph) == 1
    assert [n.name for n in model.graph.node] == [
        "relu",
        "up2",
        "down2",
        "relu2",
        "lossy_down",
        "lossy_up",
        "add",
        "id",
    ]
    assert model.graph.node[0].input[0] == "a"
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("algorithm", ["affine", "rtn", "hqq"])
def test_int4_matmul_nbits(tmp_path, algorithm):
    src = mlp(tmp_path / "mlp.onnx")
    result = quantize_model(
        src,
        tmp_path / "q4.onnx",
        QuantizeOptions("int4", int4_algorithm=algorithm, int4_block_size=32),
        reference_feeds=feeds(),
    )
    found = ops(tmp_path / "q4.onnx")
    # affine: the inner MatMul's activation widened by its block sums (MatMul + Concat); the
    # output projection (it writes y) gets symmetric 8-bit blocks, which need no offsets
    widened = 1 if algorithm == "affine" else 0
    assert found["MatMulNBits"] == 2, found
    assert found["MatMul"] == found["Concat"] == widened, found
    assert result.accuracy["y"] > 0.98, result.summary
    assert run(tmp_path / "q4.onnx", feeds(1)[0])[0].shape == (4, 32)


@pytest.mark.parametrize(
    ("precision", "algorithm"),
    [
        ("int4", "affine"),
        ("int4", "rtn"),
        ("int8-weight-only", "affine"),
        ("int8-dynamic", "affine"),
        ("int8-static", "affine"),
    ],
)
def test_a_large_model_is_staged_with_external_data(tmp_path, monkeypatch, precision, algorithm):
    """Above ``EXTERNAL_DATA_ABOVE`` the stage writes its files one tensor at a time into a
    data file (no whole-proto serialization, one copy of the weights less in memory), and the
    weight-only tiers read the weights from it one at a time: the result is the same model as
    when every file is written whole."""
    from pipeline.quantization import stage

    src = mlp(tmp_path / "mlp.onnx")
    options = QuantizeOptions(precision, int4_algorithm=algorithm)
    whole = quantize_model(src, tmp_path / "whole.onnx", options, reference_feeds=feeds())
    monkeypatch.setattr(stage, "EXTERNAL_DATA_ABOVE", 0)
    split = quantize_model(src, tmp_path / "split.onnx", options, reference_feeds=feeds())
    assert (tmp_path / "split.onnx.data").is_file() and not (tmp_path / "whole.onnx.data").exists()
    assert split.accuracy == whole.accuracy
    x = feeds(1, seed=9)[0]
    assert np.array_equal(run(tmp_path / "split.onnx", x)[0], run(tmp_path / "whole.onnx", x)[0])


def test_a_large_write_streams_its_tensors_to_a_data_file(tmp_path, monkeypatch):
    from pipeline.quantization import stage

    model = onnx.load(str(mlp(tmp_path / "mlp.onnx")))
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer]
    assert not stage._write(model, tmp_path / "small" / "m.onnx")
    monkeypatch.setattr(stage, "EXTERNAL_DATA_ABOVE", 0)
    assert stage._write(model, tmp_path / "large" / "m.onnx")
    assert (tmp_path / "large" / "m.onnx.data").is_file()
    assert not (tmp_path / "small" / "m.onnx.data").exists()
    for folder in ("small", "large"):
        saved = onnx.load(str(tmp_path / folder / "m.onnx")).graph
        assert saved.node == model.graph.node
        for tensor, want in zip(saved.initializer, weights, strict=True):
            assert np.array_equal(numpy_helper.to_array(tensor), want)


def test_int4_gptq_needs_calibration_and_runs_with_it(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    result = quantize_model(
        src,
        tmp_path / "q4.onnx",
        QuantizeOptions("int4", int4_algorithm="gptq"),
        reference_feeds=feeds(),
        calibration_feeds=feeds(4, seed=3),
    )
    assert ops(tmp_path / "q4.onnx")["MatMulNBits"] == 2
    assert result.accuracy["y"] > 0.98


def sensitive_model(path: Path) -> Path:
    """Two MatMul branches summed; the 'bad' one reads an activation with one outlier channel.

    ``h = x * s`` where ``s[0] = 3000``: per-tensor activation quantization (dynamic int8
    scales each activation tensor as a whole) gives h a scale of ~25, so every ordinary
    channel (|h| ~ 1) rounds to zero. The outlier channel's weight row is ~0, so in fp32 it
    hardly matters: the error is pure quantization noise in 'bad'. Per-channel weights cannot
    help (the outlier is in the activation, not a weight column). 'good' reads x directly.
    """
    scale = np.ones(64, np.float32)
    scale[0] = 3000.0
    w_bad = (RNG.standard_normal((64, 32)) * 0.5).astype(np.float32)
    w_bad[0] = 1e-5
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["h"], name="outlier"),
        helper.make_node("MatMul", ["h", "w_bad"], ["b"], name="bad"),
        helper.make_node("MatMul", ["x", "w_good"], ["g"], name="good"),
        helper.make_node("Add", ["b", "g"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "sensitive",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [
            numpy_helper.from_array(scale, "s"),
            numpy_helper.from_array(w_bad, "w_bad"),
            _weight("w_good", (64, 32), 0.5),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_guard_excludes_the_sensitive_node_and_the_budget_then_holds(tmp_path):
    src = sensitive_model(tmp_path / "s.onnx")
    options = QuantizeOptions("int8-dynamic", max_drop=0.005)
    unguarded = quantize_model(
        src,
        tmp_path / "plain.onnx",
        QuantizeOptions("int8-dynamic", max_drop=0.9),  # everything passes: no guard
        reference_feeds=feeds(),
    )
    assert unguarded.excluded_nodes == []
    assert 1 - unguarded.accuracy["y"] > 0.005  # the model really is sensitive
    result = quantize_model(src, tmp_path / "q.onnx", options, reference_feeds=feeds())
    assert result.sensitivity[0][0] == "bad"
    # measured: the metric's drop with only that node quantized; 'bad' is clearly worst
    assert result.sensitivity[0][1] > 100 * result.sensitivity[1][1]
    assert result.excluded_nodes == ["bad"]
    assert result.within_budget and 1 - result.accuracy["y"] <= 0.005
    found = ops(tmp_path / "q.onnx")
    assert found["MatMul"] == 1 and found["MatMulInteger"] == 1, found
    assert any("kept 1 of 2" in n for n in result.notes)


def test_int8_weight_only_keeps_activations_float(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    result = quantize_model(
        src, tmp_path / "w8.onnx", QuantizeOptions("int8-weight-only"), reference_feeds=feeds()
    )
    lowered = onnx.load(str(tmp_path / "w8.onnx"))
    nbits = [n for n in lowered.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and not ops(tmp_path / "w8.onnx")["DynamicQuantizeLinear"]
    assert all(
        helper.get_attribute_value(a) == 8 for n in nbits for a in n.attribute if a.name == "bits"
    )
    assert result.within_budget and result.accuracy["y"] > 0.9999, result.summary


def test_guard_reports_a_budget_it_cannot_meet(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    result = quantize_model(
        src,
        tmp_path / "q.onnx",
        QuantizeOptions("int4", max_drop=0.0),
        reference_feeds=feeds(),
    )
    # At most half the quantized nodes may stay float; one int4 MatMul is still lossy.
    assert len(result.excluded_nodes) == 1 and not result.within_budget
    assert ops(tmp_path / "q.onnx")["MatMulNBits"] == 1
    assert any("gave up" in n for n in result.notes)


def conv_model(path: Path, opset: int) -> Path:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [_weight("w", (8, 3, 3, 3)), _weight("b", (8,))],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


def test_opset12_per_channel_qdq_raises_opset(tmp_path):
    src = conv_model(tmp_path / "c12.onnx", opset=12)
    cal = [{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    result = quantize_model(
        src,
        tmp_path / "q.onnx",
        QuantizeOptions("int8-static", per_channel=True),
        reference_feeds=cal,
        calibration_feeds=cal,
    )
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert preprocess.default_opset(model) >= 13
    assert any("opset raised 12 -> 13" in n for n in result.notes)
    onnx.checker.check_model(model, full_check=True)
    axes = [a.i for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute]
    assert 0 in axes  # the per-channel weight DequantizeLinear (needs opset 13)
    assert result.within_budget


def _split_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("FusedMatMul", ["x", "x"], ["m"], domain="com.microsoft"),
            helper.make_node("Split", ["m"], ["a", "b"], axis=1, split=[2, 2]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 2])],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 12), helper.make_opsetid("com.microsoft", 1)],
    )


def test_opset_raise_converts_split_beside_contrib_ops():
    raised, note = preprocess.raise_opset(_split_model())
    assert preprocess.default_opset(raised) == 13 and "version converter" in note
    split = next(n for n in raised.graph.node if n.op_type == "Split")
    assert len(split.input) == 2  # opset 13 moved 'split' from attribute to input


def test_opset_raise_refuses_when_meaning_would_change(monkeypatch):
    def broken(model, version):
        raise RuntimeError("converter cannot handle this model")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    with pytest.raises(ValueError, match="Split"):
        preprocess.raise_opset(_split_model())
    # Without ops that change schema between 12 and 13, only the import is bumped.
    graph = helper.make_graph(  # Conv's schema is the same at 12 and 13 (since 11)
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3])],
        [_weight("w", (1, 1, 1, 1))],
    )
    bumped, note = preprocess.raise_opset(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    )
    assert preprocess.default_opset(bumped) == 13 and "no op in the graph" in note


def fused_model(path: Path) -> Path:
    """What our fusions emit: com.microsoft FusedMatMul and SkipLayerNormalization."""
    nodes = [
        helper.make_node(
            "FusedMatMul", ["x", "w1"], ["f"], domain="com.microsoft", alpha=0.5, name="fused"
        ),
        helper.make_node(
            "SkipLayerNormalization",
            ["f", "x", "gamma", "beta"],
            ["n"],
            domain="com.microsoft",
            epsilon=1e-5,
            name="skipln",
        ),
        helper.make_node("MatMul", ["n", "w2"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 32])],
        [
            _weight("w1", (64, 64)),
            _weight("w2", (64, 32)),
            numpy_helper.from_array(np.ones(64, np.float32), "gamma"),
            numpy_helper.from_array(np.zeros(64, np.float32), "beta"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    onnx.checker.check_model(model)  # no full_check: the checker has no contrib schemas
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8-static"])
def test_fused_model_quantizes(tmp_path, precision):
    src = fused_model(tmp_path / "fused.onnx")
    data = [{"x": RNG.standard_normal((2, 8, 64)).astype(np.float32)} for _ in range(3)]
    result = quantize_model(
        src,
        tmp_path / "q.onnx",
        QuantizeOptions(precision),
        reference_feeds=data,
        calibration_feeds=data,
    )
    found = ops(tmp_path / "q.onnx")
    assert found["SkipLayerNormalization"] == 1
    assert found["MatMul"] == 0 or found["DequantizeLinear"] > 0, found
    assert result.quantized_nodes >= 1 and result.within_budget, result.summary


def mask_model(path: Path) -> Path:
    """BERT's additive mask: scores + (1 - mask) * float32.min, then a MatMul reads it after
    a Softmax; the Add is calibrated when the user quantizes Add (ORT's default op set)."""
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["scores"], name="scores"),
        helper.make_node("Sub", ["one", "mask"], ["inv"], name="inv"),
        helper.make_node("Mul", ["inv", "fmin"], ["bias"], name="bias"),
        helper.make_node("Add", ["scores", "bias"], ["masked"], name="masked"),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "wv"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "mask",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, [2, 16]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [
            _weight("wq", (16, 16), 1.0),
            _weight("wv", (16, 8), 1.0),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(FLOAT_MIN, np.float32), "fmin"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _mask_feeds(n: int = 3) -> list[dict]:
    out = []
    for _ in range(n):
        mask = np.ones((2, 16), np.float32)
        mask[0, 12:] = 0  # right padding
        mask[1, :3] = 0  # left padding
        out.append({"x": RNG.standard_normal((2, 16)).astype(np.float32), "mask": mask})
    return out


def test_entropy_calibration_survives_float_min_masks(tmp_path):
    src = mask_model(tmp_path / "mask.onnx")
    model = onnx.load(str(src))
    data = _mask_feeds()
    dtypes = {"x": np.dtype(np.float32), "mask": np.dtype(np.float32)}
    from pipeline.quantization.calibration import FeedsReader

    # ORT alone: the histogram over [-3.4e38, 3.4e38] cannot be built.
    with pytest.raises(ValueError, match="Too many bins"):
        tiers.calibrate(
            src,
            tmp_path / "raw.json",
            FeedsReader(data, dtypes),
            method="entropy",
            op_types=["MatMul", "Add"],
        )
    clamped, names = preprocess.clamp_mask_constants(model)
    assert names == ["fmin"]
    assert numpy_helper.to_array(clamped.graph.initializer[-1]) == -1e4
    assert numpy_helper.to_array(model.graph.initializer[-1]) == np.float32(FLOAT_MIN)
    clamped_path = _save(clamped, tmp_path / "clamped.onnx")
    for method in ("entropy", "percentile"):
        cache = tmp_path / f"{method}.json"
        tiers.calibrate(
            clamped_path,
            cache,
            FeedsReader(data, dtypes),
            method=method,
            op_types=["MatMul", "Add"],
        )
        tiers.int8_static(
            src,
            tmp_path / f"q-{method}.onnx",
            cache_path=cache,
            method=method,
            op_types=["MatMul"],
            per_channel=True,
            reduce_range=False,
            activation_type="uint8",
            symmetric_weights=True,
            exclude_nodes=[],
        )
        reference = run(src, data[0])[0]
        got = run(tmp_path / f"q-{method}.onnx", data[0])[0]
        assert guard.row_cosines(reference, got).mean() > 0.98


@pytest.mark.parametrize("staged", [False, True])
def test_entropy_on_a_mask_model_end_to_end(tmp_path, monkeypatch, staged):
    """Also when the stage keeps a large model's weights on disk: static calibration reads
    them (the mask constant is found and clamped only if they were loaded)."""
    from pipeline.quantization import stage

    if staged:
        monkeypatch.setattr(stage, "EXTERNAL_DATA_ABOVE", 0)
    src = mask_model(tmp_path / "mask.onnx")
    result = quantize_model(
        src,
        tmp_path / "q.onnx",
        QuantizeOptions("int8-static", calibration_method="entropy"),
        reference_feeds=_mask_feeds(),
        calibration_feeds=_mask_feeds(),
    )
    assert result.within_budget, result.summary
    assert any("mask constant(s)" in note and "fmin" in note for note in result.notes)
    assert (tmp_path / "q.onnx.data").is_file() == staged


def test_isa_choice_from_flags():
    assert choose_int8_types(frozenset({"avx2", "avx512_vnni"}), "x86_64").isa == "vnni"
    avx2 = choose_int8_types(frozenset({"avx2", "fma"}), "x86_64")
    assert avx2.isa == "avx2" and avx2.reduce_range and avx2.activation_type == "uint8"
    arm = choose_int8_types(frozenset({"asimd", "asimddp"}), "aarch64")
    assert arm.activation_type == "int8" and not arm.reduce_range


def test_row_cosines_and_accuracy_budget():
    ref = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], np.float32)
    cand = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, -1.0]], np.float32)
    assert guard.row_cosines(ref, cand).tolist() == [1.0, 1.0, 0.0]
    acc = guard.accuracy_of([{"y": ref, "ids": np.arange(3)}], [{"y": cand, "ids": np.arange(3)}])
    assert acc.outputs["y"].mean_cosine == pytest.approx(2 / 3)
    assert acc.outputs["ids"].match_fraction == 1.0
    assert not acc.within(0.3) and acc.within(0.34)
    bad = guard.accuracy_of([{"y": ref}], [{"y": np.full_like(ref, np.nan)}])
    assert bad.outputs["y"].mean_cosine == 0.0


def test_options_are_validated():
    with pytest.raises(ValueError, match="precision"):
        QuantizeOptions("int3")
    with pytest.raises(ValueError, match="block size"):
        QuantizeOptions("int4", int4_block_size=24)
    with pytest.raises(ValueError, match="max drop"):
        QuantizeOptions("int8-dynamic", max_drop=1.5)


def test_auto_measures_every_candidate_and_keeps_the_fastest_within_budget(tmp_path):
    src = mlp(tmp_path / "mlp.onnx", hidden=256)
    result = quantize_model(
        src,
        tmp_path / "auto.onnx",
        QuantizeOptions("auto", latency_rounds=3),
        reference_feeds=feeds(batch=32),
        calibration_feeds=feeds(4, batch=32, seed=7),
    )
    labels = [c["precision"] for c in result.candidates]
    assert labels == [
        "fp32",
        "int8-dynamic",
        "int8-static-qdq",
        "int8-static-qoperator",
        "int4",
        "int8-weight-only",
    ]
    for entry in result.candidates[1:]:
        assert entry["verdict"] != "failed", entry
        # every built candidate has its accuracy, its latency ratio and a verdict recorded
        assert {"accuracy", "within_budget", "latency_ratio", "verdict"} <= set(entry), entry
    assert [c["precision"] for c in result.candidates if c.get("chosen")] != []
    (chosen,) = [c for c in result.candidates if c.get("chosen")]
    eligible = [c for c in result.candidates[1:] if c["within_budget"] and c["verdict"] == "faster"]
    if eligible:
        # the most accurate of those within the fastest one's noise (tied on speed)
        fastest = min(eligible, key=lambda c: c["latency_ratio"])
        tied = [
            c for c in eligible if c["latency_ratio"] <= fastest["latency_ratio"] + fastest["noise"]
        ]
        assert chosen is min(tied, key=lambda c: (c["drop"], c["latency_ratio"]))
        assert chosen["latency_ratio"] < 1.0
        tier = chosen["precision"].removesuffix("-qdq").removesuffix("-qoperator")
        assert result.precision == tier
    else:
        assert chosen["precision"] == "fp32" and result.precision == "fp32"
    assert run(tmp_path / "auto.onnx", feeds(1, batch=32)[0])[0].shape == (32, 32)


def test_auto_keeps_a_large_candidate_with_its_data_file(tmp_path, monkeypatch):
    """A candidate of a large model (weights in a data file beside it) that wins is written
    out whole: its data is read where it was written."""
    from types import SimpleNamespace

    from pipeline.quantization import stage
    from pipeline.runtime import timing

    monkeypatch.setattr(stage, "EXTERNAL_DATA_ABOVE", 0)
    monkeypatch.setattr(
        timing,
        "compare_latency",
        lambda *a, **k: SimpleNamespace(ratio=0.5, noise=0.01, verdict="faster"),
    )
    src = mlp(tmp_path / "mlp.onnx")
    result = quantize_model(
        src, tmp_path / "auto.onnx", QuantizeOptions("auto"), reference_feeds=feeds()
    )
    assert result.precision != "fp32", result.candidates
    x = feeds(1, seed=9)[0]
    assert run(tmp_path / "auto.onnx", x)[0].shape == run(src, x)[0].shape


def test_auto_prefers_the_most_accurate_of_candidates_tied_on_speed():
    from pipeline.quantization.stage import _pick

    def candidate(name, ratio, noise, drop):
        return (type("R", (), {"drop": drop})(), name, {"latency_ratio": ratio, "noise": noise})

    fast = candidate("fast", 0.44, 0.07, 0.0042)
    accurate = candidate("accurate", 0.46, 0.09, 0.0019)
    slow = candidate("slow", 0.60, 0.05, 0.0001)
    assert _pick([fast, accurate, slow])[1] == "accurate"
    assert _pick([candidate("a", 0.30, 0.02, 0.004), accurate])[1] == "a"  # clearly faster


def _cli(*args) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"OMP_NUM_THREADS": "1"})


def test_cli_int8_dynamic_end_to_end(tmp_path):
    src = mlp(tmp_path / "mlp.onnx", hidden=128)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    done = _cli(
        src,
        "-o",
        out,
        "--report",
        report,
        "--precision",
        "int8-dynamic",
        "--no-speed-check",
        "--max-cosine-drop",
        "0.01",
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    section = data["quantization"]
    assert section["precision"] == "int8-dynamic"
    assert section["final_check"]["passed"] is True
    assert ops(out)["MatMulInteger"] == 2


def test_cli_budget_miss_exits_1_naming_the_stage(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    done = _cli(
        src,
        "-o",
        out,
        "--report",
        report,
        "--precision",
        "int8-dynamic",
        "--no-speed-check",
        "--max-cosine-drop",
        "0.0000001",
    )
    assert done.returncode == 1, done.stderr
    assert "quantize int8-dynamic: mean cosine" in " ".join(done.stderr.split())
    assert not out.exists()
    data = json.loads(report.read_text())
    assert data["status"] == "verification_failed"
    assert data["quantization"]["final_check"]["passed"] is False


# --- padded positions, Constant weights, calibration set counts, Gemm for int4, contrib types


def test_guard_does_not_score_padded_positions():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((2, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    cand = ref.copy()
    cand[0, 3:] = -ref[0, 3:]  # garbage only where the mask is 0
    pooled = ref.mean(axis=1)  # [B, H]: not shaped like the mask, scored as before
    feed = {"input_ids": np.ones((2, 5), np.int64), "attention_mask": mask}
    refs, cands = [{"h": ref, "p": pooled}], [{"h": cand, "p": pooled + 1e-3}]
    unmasked = guard.accuracy_of(refs, cands)
    assert unmasked.outputs["h"].mean_cosine == pytest.approx((8 - 2) / 10)  # 2 rows at -1
    masked = guard.accuracy_of(refs, cands, [feed])
    assert masked.outputs["h"].mean_cosine == pytest.approx(1.0)
    assert masked.outputs["h"].masked_by == "attention_mask"
    details = masked.to_dict()
    assert "mean_cosine_masked" in details["h"] and "mean_cosine" not in details["h"]
    assert details["p"]["mean_cosine"] < 1.0 and "masked_by" not in details["p"]
    assert masked.within(1e-4) and not unmasked.within(0.1)
    only_h = guard.accuracy_of([{"h": ref}], [{"h": cand}], [feed])
    assert "padding not scored" in only_h.summary(0.0)
    # rank-2 per-token outputs: padded entries zeroed in both before the row cosine
    logits, bad = ref[..., 0], ref[..., 0].copy()
    bad[0, 3:] += 100.0
    assert guard.accuracy_of([{"l": logits}], [{"l": bad}], [feed]).within(1e-9)


def constant_conv_model(path: Path) -> Path:
    """Opset-12 Conv whose weight and bias are Constant nodes (how Paddle exports weights)."""
    weight = (RNG.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    bias = (RNG.standard_normal(8) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["conv2d_394.w_0"], value=numpy_helper.from_array(weight)),
        helper.make_node("Constant", [], ["conv2d_394.b_0"], value=numpy_helper.from_array(bias)),
        helper.make_node("Conv", ["x", "conv2d_394.w_0", "conv2d_394.b_0"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 14, 14])],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), path)


@pytest.mark.parametrize(
    ("precision", "fmt"),
    [("int8-dynamic", "qdq"), ("int8-static", "qdq"), ("int8-static", "qoperator")],
)
def test_constant_node_weights_are_lifted_and_quantized(tmp_path, precision, fmt):
    src = constant_conv_model(tmp_path / "paddle.onnx")
    rng = np.random.default_rng(5)
    data = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(3)]
    result = quantize_model(
        src,
        tmp_path / "q.onnx",
        QuantizeOptions(precision, quant_format=fmt),
        reference_feeds=data,
        calibration_feeds=data,
    )
    assert any("2 Constant node(s) lifted" in n for n in result.notes), result.notes
    found = ops(tmp_path / "q.onnx")
    assert found["Constant"] == 0 and found["Conv"] == 0 or found["DequantizeLinear"] >= 2, found
    assert result.quantized_nodes >= 1 and result.within_budget, result.summary


@pytest.mark.parametrize("count", [16, 20])
def test_static_calibration_uses_every_set(tmp_path, count):
    """ORT's MinMax calibrator drops its sets when max_intermediate_outputs (16) is reached."""
    src = mlp(tmp_path / "mlp.onnx")
    data = feeds(count, seed=11)
    data[0] = {"x": data[0]["x"] * 50.0}  # the widest range lives in the FIRST set only
    cache = tmp_path / "cache"
    result = quantize_model(
        src,
        tmp_path / "q.onnx",
        QuantizeOptions("int8-static", cache_dir=cache),
        reference_feeds=feeds(),
        calibration_feeds=data,
    )
    assert result.quantized_nodes >= 1
    (cached,) = cache.glob("calibration-*.json")
    ranges = json.loads(cached.read_text())
    text = json.dumps(ranges)
    assert '"x"' in text
    widest = float(np.abs(data[0]["x"]).max())
    lowest, highest = _range_of(ranges, "x")
    assert max(-lowest, highest) >= widest * 0.99


def _range_of(cache: dict, name: str) -> tuple[float, float]:
    entry = cache[name] if name in cache else cache.get("data", {})[name]
    if isinstance(entry, dict):
        for key in ("lowest", "min"):
            if key in entry:
                low = entry[key]
                high = entry["highest" if key == "lowest" else "max"]
                return _scalar(low), _scalar(high)
        if "range_value" in entry:
            return tuple(_scalar(v) for v in entry["range_value"])
    return tuple(_scalar(v) for v in entry)


def _scalar(value) -> float:
    while isinstance(value, dict):
        value = value.get("data", value.get("value"))
    return float(np.asarray(value).ravel()[0])


def test_symbolic_shape_failure_falls_back_and_the_stage_proceeds(tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as shape_inference

    real = shape_inference.quant_pre_process

    def flaky(model, output, *args, skip_symbolic_shape=False, **kwargs):
        if not skip_symbolic_shape:
            raise RuntimeError("symbolic shape inference exploded")
        return real(model, output, *args, skip_symbolic_shape=True, **kwargs)

    monkeypatch.setattr(shape_inference, "quant_pre_process", flaky)
    src = mlp(tmp_path / "mlp.onnx")
    result = quantize_model(
        src, tmp_path / "q.onnx", QuantizeOptions("int8-dynamic"), reference_feeds=feeds()
    )
    assert any("symbolic shape inference failed" in n for n in result.notes), result.notes
    assert result.quantized_nodes == 2 and result.within_budget


def gemm_model(path: Path) -> Path:
    """x[4, 64] -> Gemm(transB=1, bias) -> Relu -> Gemm(no bias) -> Gemm(alpha=2, kept)."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2"], ["z"], name="g2"),
        helper.make_node("Gemm", ["z", "w3", "b3"], ["y"], name="g3", alpha=2.0),
    ]
    graph = helper.make_graph(
        nodes,
        "gemms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [
            _weight("w1", (64, 64)),  # [N, K]: transB
            _weight("b1", (64,)),
            _weight("w2", (64, 32)),
            _weight("w3", (32, 16)),
            _weight("b3", (16,)),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_lower_gemm_to_matmul_parity_and_ops(tmp_path):
    src = gemm_model(tmp_path / "gemm.onnx")
    model, lowered = preprocess.lower_gemm_to_matmul(onnx.load(str(src)))
    assert lowered == 2
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "Relu", "MatMul", "Gemm"]
    assert "w1" not in {i.name for i in model.graph.initializer}  # replaced by its transpose
    onnx.checker.check_model(model, full_check=True)
    x = {"x": np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(got.run(None, x)[0], expected.run(None, x)[0], rtol=1e-5, atol=1e-5)
    # transA / alpha / non-constant B: not lowered
    again, count = preprocess.lower_gemm_to_matmul(model)
    assert count == 0 and [n.op_type for n in again.graph.node][-1] == "Gemm"


def test_int4_quantizes_gemm_weights(tmp_path):
    src = gemm_model(tmp_path / "gemm.onnx")
    data = [
        {"x": np.random.default_rng(s).standard_normal((4, 64)).astype(np.float32)}
        for s in range(2)
    ]
    result = quantize_model(src, tmp_path / "q.onnx", QuantizeOptions("int4"), reference_feeds=data)
    found = ops(tmp_path / "q.onnx")
    # affine (the default): each lowered MatMul's activation is widened by its block sums
    assert found["MatMulNBits"] == 2 and found["MatMul"] == found["Concat"] == 2, found
    assert result.quantized_nodes == 2
    assert any("2 Gemm node(s) lowered" in n for n in result.notes), result.notes
    assert any("int4: 2 of 2 MatMul" in n for n in result.notes), result.notes


def contrib_model() -> onnx.ModelProto:
    """x -> com.microsoft Gelu -> MatMul -> Relu: ONNX infers no type for g and m."""
    nodes = [
        helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft", name="gelu"),
        helper.make_node("MatMul", ["g", "w"], ["m"], name="mm"),
        helper.make_node("Relu", ["m"], ["y"], name="relu"),  # m: not an output, type unknown
    ]
    graph = helper.make_graph(
        nodes,
        "contrib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [_weight("w", (64, 32))],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    return model


@pytest.mark.parametrize("static", [False, True])
def test_contrib_op_outputs_of_unknown_type_quantize(tmp_path, static):
    """No value_info for the contrib op's output: ORT's quantizer needs DefaultTensorType."""
    src = tmp_path / "contrib.onnx"
    onnx.save(contrib_model(), src)  # no full_check: the checker has no com.microsoft schemas
    out = tmp_path / "q.onnx"
    common = {
        "op_types": ["MatMul"],
        "per_channel": True,
        "reduce_range": False,
        "symmetric_weights": True,
        "exclude_nodes": [],
    }
    if static:
        cache = tmp_path / "ranges.json"
        rng = np.random.default_rng(4)
        reader = tiers_reader([{"x": rng.standard_normal((2, 64)).astype(np.float32)}])
        tiers.calibrate(src, cache, reader, method="minmax", op_types=["MatMul"])
        tiers.int8_static(
            src,
            out,
            cache_path=cache,
            method="minmax",
            activation_type="uint8",
            quant_format="qdq",
            **common,
        )
    else:
        tiers.int8_dynamic(src, out, **common)
    assert ops(out)["MatMul"] == 0 or ops(out)["DequantizeLinear"] >= 1, ops(out)
    x = {"x": np.ones((2, 64), np.float32)}
    assert run(out, x)[0].shape == (2, 32)


def tiers_reader(sets: list[dict]):
    from pipeline.quantization.calibration import FeedsReader

    return FeedsReader(sets, {"x": np.dtype(np.float32)})


def decoy_model(path: Path) -> Path:
    """A sensitive node that a noise proxy ranks second, behind a harmless 'decoy'.

    'bad' reads ``x * s`` with a moderate outlier (s[0] = 30): its output keeps ~20 dB of
    SQNR but carries most of y, so its noise reaches y. 'decoy' reads an extreme outlier
    (s[0] = 1e5): every ordinary channel rounds to zero (SQNR ~0 dB, the worst), but its
    output is scaled by 1e-4 before it joins y, so its noise never shows. Keeping 'bad' in
    float is enough; a proxy that keeps the lowest-SQNR node first needs two.
    """
    rng = np.random.default_rng(5)
    mild, extreme = np.ones(64, np.float32), np.ones(64, np.float32)
    mild[0], extreme[0] = 30.0, 1e5
    weights = {
        "s_mild": mild,
        "s_extreme": extreme,
        "w_bad": (rng.standard_normal((64, 32)) * 0.5).astype(np.float32),
        "w_decoy": (rng.standard_normal((64, 32)) * 0.5).astype(np.float32),
        "w_good": (rng.standard_normal((64, 32)) * 0.1).astype(np.float32),
        "tiny": np.array(1e-4, np.float32),
    }
    weights["w_bad"][0] = weights["w_decoy"][0] = 1e-5
    nodes = [
        helper.make_node("Mul", ["x", "s_mild"], ["hm"], name="mild"),
        helper.make_node("Mul", ["x", "s_extreme"], ["he"], name="extreme"),
        helper.make_node("MatMul", ["hm", "w_bad"], ["b"], name="bad"),
        helper.make_node("MatMul", ["he", "w_decoy"], ["d"], name="decoy"),
        helper.make_node("Mul", ["d", "tiny"], ["ds"], name="shrink"),
        helper.make_node("MatMul", ["x", "w_good"], ["g"], name="good"),
        helper.make_node("Add", ["b", "g"], ["bg"], name="sum1"),
        helper.make_node("Add", ["bg", "ds"], ["y"], name="sum2"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_guard_keeps_fewer_nodes_float_than_a_noise_proxy_would(tmp_path):
    src = decoy_model(tmp_path / "decoy.onnx")
    sets = feeds(4, batch=8)
    model = onnx.load(str(src))
    proxy = guard.sensitivity(
        model, None, ["bad", "decoy", "good"], sets, guard.Scheme(tiers.TIERS["int8-dynamic"])
    )
    assert [name for name, _ in proxy][:2] == ["decoy", "bad"]  # SQNR puts the decoy first
    budget = 0.002
    full = quantize_model(
        src,
        tmp_path / "all.onnx",
        QuantizeOptions("int8-dynamic", max_drop=0.9),
        reference_feeds=sets,
    )
    assert 1 - full.accuracy["y"] > budget  # the budget is really missed with every node
    result = quantize_model(
        src,
        tmp_path / "q.onnx",
        QuantizeOptions("int8-dynamic", max_drop=budget),
        reference_feeds=sets,
    )
    assert result.within_budget and result.excluded_nodes == ["bad"]
    assert result.sensitivity[0][0] == "bad"
    assert [p["kept_float"] for p in result.guard_path] == [0, 1]
    assert ops(tmp_path / "q.onnx")["MatMulInteger"] == 2
    # the proxy's order would have kept 'decoy' first, which does not hold the budget
    decoy_only = quantize_model(
        src,
        tmp_path / "d.onnx",
        QuantizeOptions("int8-dynamic", max_drop=0.9, exclude_nodes=("decoy",)),
        reference_feeds=sets,
    )
    assert 1 - decoy_only.accuracy["y"] > budget


def test_fewest_within_doubles_then_bisects_to_the_smallest_count():
    from pipeline.quantization.exclusions import Point, fewest_within

    class Drop:
        def __init__(self, drop):
            self.drop = drop

        def within(self, budget):
            return self.drop <= budget

        def summary(self, budget):
            return f"{self.drop}"

    measured = []

    def measure(count):
        measured.append(count)
        return Point(count, Drop(1.0 / (count + 1)), f"m{count}")  # within 0.1 from 9 on

    chosen, path = fewest_within(20, measure, 0.1, Point(0, Drop(1.0), "m0"))
    assert chosen.kept_float == 9 and chosen.path == "m9"
    assert measured == [1, 2, 4, 8, 16, 12, 10, 9]
    assert [p.kept_float for p in path] == sorted(measured + [0])
    measured.clear()
    chosen, _ = fewest_within(5, measure, 0.01, Point(0, Drop(1.0), "m0"))
    assert chosen.kept_float == 5 and measured == [1, 2, 4, 5]  # never within: the limit


def test_cli_plugin_metric_with_held_out_data_end_to_end(tmp_path):
    src = mlp(tmp_path / "mlp.onnx", hidden=128)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for index, feed in enumerate(feeds(12, batch=4, seed=11)):
        np.savez(data_dir / f"{index}.npz", **feed)
    scorer = tmp_path / "scorer.py"
    scorer.write_text(
        "import numpy as np\n"
        "def relative_error(reference, candidate, feeds):\n"
        "    ref = np.concatenate([r['y'] for r in reference])\n"
        "    got = np.concatenate([c['y'] for c in candidate])\n"
        "    return float(np.abs(got - ref).max() / np.abs(ref).max())\n"
    )
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    done = _cli(
        src,
        "-o",
        out,
        "--report",
        report,
        "--precision",
        "int8-dynamic",
        "--no-speed-check",
        "--metric",
        f"{scorer}:relative_error",
        "--max-drop",
        "0.05",
        "--calibration",
        data_dir,
    )
    assert done.returncode == 0, done.stderr
    section = json.loads(report.read_text())["quantization"]
    assert section["metric"] == f"{scorer}:relative_error"
    check = section["final_check"]
    assert check["passed"] and check["metric"] == section["metric"]
    assert "held-out evaluation data" in check["against"]
    assert 0 < check["outputs"]["loss"] <= 0.05
    assert "held out by content hash" in section["data"]["evaluation"]
    assert section["data"]["decision"] == "the calibration set(s)"


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--metric", "perplexity"), "causal LM"),
        (("--metric", "no_such_module_q:f"), "cannot import"),
        (("--evaluation", "."), "--evaluation needs --calibration"),
        (("--calibration", "/no/such/folder"), "not found"),
    ],
)
def test_cli_metric_and_data_mistakes_exit_2_before_any_work(tmp_path, extra, message):
    src = mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "out.onnx"
    done = _cli(src, "-o", out, "--precision", "int8-dynamic", "--no-speed-check", *extra)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in " ".join((done.stdout + done.stderr).split())
    assert not out.exists()


def test_cli_auto_prints_the_candidates_it_measured_and_reports_the_front(tmp_path):
    src = mlp(tmp_path / "mlp.onnx", hidden=256)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    done = _cli(src, "-o", out, "--report", report, "--precision", "auto", "--no-speed-check")
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    assert "auto: candidates measured (cosine" in text
    section = json.loads(report.read_text())["quantization"]
    labels = [c["precision"] for c in section["candidates"]]
    for label in labels:
        assert label in text
    built = [c for c in section["candidates"][1:] if c["verdict"] != "failed"]
    assert built and all("guard_path" in c and "latency_ratio" in c for c in built)
    assert sum(1 for c in section["candidates"] if c.get("chosen")) == 1


def attention_model(path: Path) -> Path:
    """x -> com.microsoft Attention (packed Q/K/V weight, raw 2D mask) -> MatMul -> y."""
    nodes = [
        helper.make_node(
            "Attention",
            ["x", "qkv", "qkv_bias", "mask"],
            ["a"],
            domain="com.microsoft",
            num_heads=4,
            name="attention",
        ),
        helper.make_node("MatMul", ["a", "w_out"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64]),
            helper.make_tensor_value_info("mask", TensorProto.INT32, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 64])],
        [
            _weight("qkv", (64, 192), 0.2),
            numpy_helper.from_array(np.zeros(192, np.float32), "qkv_bias"),
            _weight("w_out", (64, 64), 0.2),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_dynamic_int8_quantizes_the_fused_attention_weight(tmp_path):
    src = attention_model(tmp_path / "att.onnx")
    rng = np.random.default_rng(2)
    mask = np.ones((2, 6), np.int32)
    mask[1, 4:] = 0  # right padding: QAttention must honour the raw mask
    data = [{"x": rng.standard_normal((2, 6, 64)).astype(np.float32), "mask": mask}]
    result = quantize_model(
        src,
        tmp_path / "q.onnx",
        QuantizeOptions("int8-dynamic", max_drop=0.02),
        reference_feeds=data,
    )
    found = ops(tmp_path / "q.onnx")
    assert found["QAttention"] == 1 and found["Attention"] == 0, found
    assert result.quantized_nodes == 2 and result.within_budget, result.summary
