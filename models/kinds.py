"""Small models of the kinds third-party users bring, each with the trait that trips tools.

Every builder returns an ``onnx.ModelProto`` with fixed-seed random weights (the int8 ones
write files, because ONNX Runtime's quantizer works on files). What each one is for:

- ``old_zoo_cnn``: opset 9, IR version 3, BatchNormalization left unfused after Conv, and
  every initializer also listed as a graph input, as the old model-zoo exporters did.
- ``paddle_ocr``: opset 11, ``[N, 3, H, W]`` with dynamic H and W (Paddle2ONNX dim names), a
  ``Shape -> Slice/Gather -> Concat -> Reshape`` chain to ``[N, C, H*W]``, then Transpose,
  MatMul, Softmax.
- ``recurrent``: a Loop with a constant trip count accumulating through outer-scope values,
  and an If on a computed condition; optionally with subgraph nodes NOT in topological order.
- ``sklearn_logreg_zipmap`` / ``sklearn_scaler_forest``: ``ai.onnx.ml`` models from
  skl2onnx; the first outputs a sequence of maps (ZipMap).
- ``quantized_static_qdq`` / ``quantized_dynamic``: int8 models from ONNX Runtime's
  quantizer; an optimizer must not fold DequantizeLinear back into float weights.
- ``output_32_1_8210``: output declared ``[32, 1, 8210]`` behind a Reshape/Unsqueeze chain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _value_info(tensor: TensorProto) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


# --------------------------------------------------------------------------------------
# old model-zoo CNN


def old_zoo_cnn() -> onnx.ModelProto:
    """Conv-BN-Relu-MaxPool x2, Reshape + Gemm, Softmax; opset 9, IR 3, weights as inputs.

    ``data: float[1, 3, 32, 32] -> prob: float[1, 10]``. Two Dropouts (no-ops at inference)
    sit where old exporters left them.
    """
    rng = np.random.default_rng(SEED)
    inits: list[TensorProto] = []
    nodes = []
    x = "data"
    channels = 3
    for i, out_ch in enumerate((8, 16), start=1):
        w = rng.standard_normal((out_ch, channels, 3, 3)).astype(np.float32) * 0.3
        inits += [
            _init(f"conv{i}_w", w),
            _init(f"conv{i}_b", rng.standard_normal(out_ch).astype(np.float32) * 0.1),
            _init(f"bn{i}_scale", rng.uniform(0.5, 1.5, out_ch).astype(np.float32)),
            _init(f"bn{i}_bias", rng.standard_normal(out_ch).astype(np.float32) * 0.1),
            _init(f"bn{i}_mean", rng.standard_normal(out_ch).astype(np.float32) * 0.1),
            _init(f"bn{i}_var", rng.uniform(0.5, 2.0, out_ch).astype(np.float32)),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [x, f"conv{i}_w", f"conv{i}_b"],
                [f"conv{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[1, 1],
                name=f"conv{i}",
            ),
            helper.make_node(
                "BatchNormalization",
                [f"conv{i}", f"bn{i}_scale", f"bn{i}_bias", f"bn{i}_mean", f"bn{i}_var"],
                [f"bn{i}"],
                epsilon=1e-5,
                momentum=0.9,
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"relu{i}"),
            helper.make_node(
                "MaxPool",
                [f"relu{i}"],
                [f"pool{i}"],
                kernel_shape=[2, 2],
                strides=[2, 2],
                name=f"pool{i}",
            ),
        ]
        x, channels = f"pool{i}", out_ch
    inits += [
        _init("reshape_shape", np.array([1, -1], dtype=np.int64)),
        _init("fc_w", rng.standard_normal((10, 16 * 8 * 8)).astype(np.float32) * 0.05),
        _init("fc_b", rng.standard_normal(10).astype(np.float32) * 0.1),
    ]
    nodes += [
        helper.make_node("Dropout", [x], ["drop1"], ratio=0.5, name="drop1"),
        helper.make_node("Reshape", ["drop1", "reshape_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], transB=1, name="fc"),
        helper.make_node("Dropout", ["fc"], ["drop2"], ratio=0.5, name="drop2"),
        helper.make_node("Softmax", ["drop2"], ["prob"], axis=1, name="prob"),
    ]
    graph = helper.make_graph(
        nodes,
        "old_zoo_cnn",
        [helper.make_tensor_value_info("data", FLOAT, [1, 3, 32, 32])]
        + [_value_info(t) for t in inits],  # initializers listed as inputs, IR 3 style
        [helper.make_tensor_value_info("prob", FLOAT, [1, 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 9)], producer_name="old-zoo-style"
    )
    model.ir_version = 3
    return model


# --------------------------------------------------------------------------------------
# Paddle-style OCR head with dynamic H and W

PADDLE_DIMS = ("p2o.DynamicDimension.0", "p2o.DynamicDimension.1", "p2o.DynamicDimension.2")


def paddle_ocr(opset: int = 11) -> onnx.ModelProto:
    """``x: float[N, 3, H, W] -> softmax_0.tmp_0: float[N, H*W, 12]`` (dims named by Paddle).

    The sequence is built the way Paddle2ONNX writes ``reshape(x, [0, C, -1])``: Shape, then
    Slice for N, Gather for C, H, W, Mul for H*W, Unsqueeze + Concat, Reshape.
    """
    rng = np.random.default_rng(SEED + 1)
    n, h, w = PADDLE_DIMS
    inits = [
        _init("conv_w", rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3),
        _init("conv_b", rng.standard_normal(8).astype(np.float32) * 0.1),
        _init("fc_w", rng.standard_normal((8, 12)).astype(np.float32) * 0.5),
        _init("fc_b", rng.standard_normal(12).astype(np.float32) * 0.1),
        _init("starts0", np.array([0], dtype=np.int64)),
        _init("ends1", np.array([1], dtype=np.int64)),
        _init("axes0", np.array([0], dtype=np.int64)),
        _init("idx1", np.array(1, dtype=np.int64)),
        _init("idx2", np.array(2, dtype=np.int64)),
        _init("idx3", np.array(3, dtype=np.int64)),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "conv_w", "conv_b"],
            ["conv"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            name="conv2d_0",
        ),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu_0"),
        helper.make_node("Shape", ["relu"], ["shape"], name="shape_0"),
        helper.make_node("Slice", ["shape", "starts0", "ends1", "axes0"], ["n"], name="slice_0"),
        helper.make_node("Gather", ["shape", "idx1"], ["c"], axis=0, name="gather_c"),
        helper.make_node("Gather", ["shape", "idx2"], ["h"], axis=0, name="gather_h"),
        helper.make_node("Gather", ["shape", "idx3"], ["w"], axis=0, name="gather_w"),
        helper.make_node("Mul", ["h", "w"], ["hw"], name="mul_hw"),
        helper.make_node("Unsqueeze", ["c"], ["c1"], axes=[0], name="unsqueeze_c"),
        helper.make_node("Unsqueeze", ["hw"], ["hw1"], axes=[0], name="unsqueeze_hw"),
        helper.make_node("Concat", ["n", "c1", "hw1"], ["new_shape"], axis=0, name="concat_0"),
        helper.make_node("Reshape", ["relu", "new_shape"], ["seq"], name="reshape_0"),
        helper.make_node("Transpose", ["seq"], ["seq_t"], perm=[0, 2, 1], name="transpose_0"),
        helper.make_node("MatMul", ["seq_t", "fc_w"], ["logits"], name="matmul_0"),
        helper.make_node("Add", ["logits", "fc_b"], ["logits_b"], name="add_0"),
        helper.make_node("Softmax", ["logits_b"], ["softmax_0.tmp_0"], axis=2, name="softmax_0"),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle_ocr",
        [helper.make_tensor_value_info("x", FLOAT, [n, 3, h, w])],
        [helper.make_tensor_value_info("softmax_0.tmp_0", FLOAT, [n, None, 12])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="PaddlePaddle"
    )
    model.ir_version = 6
    return model


# --------------------------------------------------------------------------------------
# Loop + If


def recurrent(unsorted_subgraphs: bool = False) -> onnx.ModelProto:
    """A Loop (trip count 5) and an If on a computed condition, over ``x: float[B, 4]``.

    Loop body: ``acc' = tanh(acc @ W + x)`` with ``W`` and ``x`` from the outer scope, plus a
    scan output of every step. Then ``If(sum(acc) > 0)``: ``acc * 2 + 1`` else ``-acc``.
    With ``unsorted_subgraphs`` the nodes of the Loop body and both If branches are listed
    in reverse order: legal to execute, rejected by the ONNX checker's order check.
    """
    rng = np.random.default_rng(SEED + 2)
    order = (lambda ns: list(reversed(ns))) if unsorted_subgraphs else list

    body = helper.make_graph(
        order(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
                helper.make_node("MatMul", ["acc_in", "W"], ["mm"], name="body_matmul"),
                helper.make_node("Add", ["mm", "x"], ["pre"], name="body_add"),
                helper.make_node("Tanh", ["pre"], ["acc_out"], name="body_tanh"),
                helper.make_node("Identity", ["acc_out"], ["step_out"], name="body_scan"),
            ]
        ),
        "loop_body",
        [
            helper.make_tensor_value_info("iter", INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", FLOAT, ["B", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", FLOAT, ["B", 4]),
            helper.make_tensor_value_info("step_out", FLOAT, ["B", 4]),
        ],
    )
    then_branch = helper.make_graph(
        order(
            [
                helper.make_node(
                    "Constant",
                    [],
                    ["two"],
                    value=_init("two_t", np.array(2.0, np.float32)),
                    name="then_two",
                ),
                helper.make_node("Mul", ["acc", "two"], ["doubled"], name="then_mul"),
                helper.make_node("Add", ["doubled", "one"], ["then_out"], name="then_add"),
            ]
        ),
        "then_branch",
        [],
        [helper.make_tensor_value_info("then_out", FLOAT, ["B", 4])],
    )
    else_branch = helper.make_graph(
        order(
            [
                helper.make_node("Neg", ["acc"], ["negated"], name="else_neg"),
                helper.make_node("Identity", ["negated"], ["else_out"], name="else_identity"),
            ]
        ),
        "else_branch",
        [],
        [helper.make_tensor_value_info("else_out", FLOAT, ["B", 4])],
    )
    inits = [
        _init("W", rng.standard_normal((4, 4)).astype(np.float32) * 0.5),
        _init("trip_count", np.array(5, dtype=np.int64)),
        _init("true", np.array(True)),
        _init("zero", np.array(0.0, dtype=np.float32)),
        _init("one", np.array(1.0, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node(
            "Loop", ["trip_count", "true", "x"], ["acc", "steps"], body=body, name="loop"
        ),
        helper.make_node("ReduceSum", ["acc"], ["total"], keepdims=0, name="total"),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="positive"),
        helper.make_node(
            "If",
            ["positive"],
            ["y"],
            then_branch=then_branch,
            else_branch=else_branch,
            name="branch",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "recurrent",
        [helper.make_tensor_value_info("x", FLOAT, ["B", 4])],
        [
            helper.make_tensor_value_info("y", FLOAT, ["B", 4]),
            helper.make_tensor_value_info("steps", FLOAT, [5, "B", 4]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


# --------------------------------------------------------------------------------------
# scikit-learn (ai.onnx.ml)


def _iris_like(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((120, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y


def sklearn_logreg_zipmap() -> onnx.ModelProto:
    """LogisticRegression (3 classes) with ZipMap: ``output_probability`` is seq(map)."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x, y = _iris_like(np.random.default_rng(SEED + 3))
    clf = LogisticRegression(max_iter=500).fit(x, y)
    return to_onnx(clf, x[:1], target_opset={"": 15, "ai.onnx.ml": 3})


def sklearn_scaler_forest() -> onnx.ModelProto:
    """StandardScaler + RandomForestClassifier (4 trees of depth 3), without ZipMap."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _iris_like(np.random.default_rng(SEED + 4))
    pipe = make_pipeline(
        StandardScaler(), RandomForestClassifier(n_estimators=4, max_depth=3, random_state=0)
    ).fit(x, y)
    return to_onnx(
        pipe,
        x[:1],
        target_opset={"": 15, "ai.onnx.ml": 3},
        options={"zipmap": False},
    )


# --------------------------------------------------------------------------------------
# int8 (ONNX Runtime quantization)


def float_cnn() -> onnx.ModelProto:
    """``input: float[N, 3, 16, 16] -> logits: float[N, 10]``: Conv-Relu x2, pool, Gemm."""
    rng = np.random.default_rng(SEED + 5)
    inits = [
        _init("w1", rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3),
        _init("b1", rng.standard_normal(16).astype(np.float32) * 0.1),
        _init("w2", rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.1),
        _init("b2", rng.standard_normal(32).astype(np.float32) * 0.1),
        _init("fc_w", rng.standard_normal((10, 32)).astype(np.float32) * 0.2),
        _init("fc_b", rng.standard_normal(10).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "float_cnn",
        [helper.make_tensor_value_info("input", FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def float_mlp() -> onnx.ModelProto:
    """``input: float[N, 64] -> out: float[N, 16]``: MatMul+Add+Relu, MatMul+Add ."""
    rng = np.random.default_rng(SEED + 6)
    inits = [
        _init("w1", rng.standard_normal((64, 128)).astype(np.float32) * 0.1),
        _init("b1", rng.standard_normal(128).astype(np.float32) * 0.1),
        _init("w2", rng.standard_normal((128, 16)).astype(np.float32) * 0.1),
        _init("b2", rng.standard_normal(16).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["out"], name="add2"),
    ]
    graph = helper.make_graph(
        nodes,
        "float_mlp",
        [helper.make_tensor_value_info("input", FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("out", FLOAT, ["N", 16])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


class _RandomCalibration:
    """A tiny CalibrationDataReader: a few fixed-seed batches for one input."""

    def __init__(self, name: str, shape: tuple[int, ...], batches: int = 4) -> None:
        rng = np.random.default_rng(SEED + 7)
        self._batches = iter(
            [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(batches)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantized_static_qdq(path: str | Path) -> Path:
    """``float_cnn`` quantized with ``quantize_static`` (QDQ, int8 weights) into ``path``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path = Path(path)
    source = path.with_name(path.stem + ".float.onnx")
    onnx.save(float_cnn(), source)
    try:
        quantize_static(
            source,
            path,
            _RandomCalibration("input", (2, 3, 16, 16)),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        source.unlink()
    return path


def quantized_dynamic(path: str | Path) -> Path:
    """``float_mlp`` quantized with ``quantize_dynamic`` (int8 weights) into ``path``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    source = path.with_name(path.stem + ".float.onnx")
    onnx.save(float_mlp(), source)
    try:
        quantize_dynamic(source, path, weight_type=QuantType.QInt8)
    finally:
        source.unlink()
    return path


# --------------------------------------------------------------------------------------
# an output of shape [32, 1, 8210]

OUTPUT_32_1_8210 = [32, 1, 8210]


def output_32_1_8210() -> onnx.ModelProto:
    """``x: float[32, 8210] -> y: float[32, 1, 8210]`` through Reshape/Unsqueeze/Identity.

    Several of the nodes are no-ops (a same-shape Reshape, an Identity, ``*1``) so the default
    recipe changes the graph; the output's declared shape must survive that.
    """
    rng = np.random.default_rng(SEED + 8)
    inits = [
        _init("bias", rng.standard_normal(8210).astype(np.float32)),
        _init("same_shape", np.array([32, -1], dtype=np.int64)),
        _init("axes1", np.array([1], dtype=np.int64)),
        _init("out_shape", np.array(OUTPUT_32_1_8210, dtype=np.int64)),
        _init("one", np.array(1.0, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("Add", ["x", "bias"], ["biased"], name="add"),
        helper.make_node("Reshape", ["biased", "same_shape"], ["flat"], name="reshape_same"),
        helper.make_node("Unsqueeze", ["flat", "axes1"], ["unsq"], name="unsqueeze"),
        helper.make_node("Identity", ["unsq"], ["ident"], name="identity"),
        helper.make_node("Mul", ["ident", "one"], ["scaled"], name="times_one"),
        helper.make_node("Reshape", ["scaled", "out_shape"], ["y"], name="reshape_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "output_32_1_8210",
        [helper.make_tensor_value_info("x", FLOAT, [32, 8210])],
        [helper.make_tensor_value_info("y", FLOAT, OUTPUT_32_1_8210)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model
