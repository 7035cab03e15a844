"""int4 with float block offsets (pipeline/quantization/int4_affine.py): exact on a Q4_1 grid,
and what ORT's integer-zero-point RTN loses on the same weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from pipeline.quantization import int4_affine
from pipeline.runtime.sessions import create_session

K, N, BLOCK = 128, 48, 32


def q4_1_weight(seed: int = 0) -> np.ndarray:
    """A weight on GGUF's Q4_1 grid: per 32-block along K and column, w = d * q + m."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.005, 0.05, (K // BLOCK, 1, N)).astype(np.float32)
    m = rng.uniform(-0.3, 0.0, (K // BLOCK, 1, N)).astype(np.float32)
    q = rng.integers(0, 16, (K // BLOCK, BLOCK, N)).astype(np.float32)
    q[:, 0], q[:, 1] = 0, 15  # every block spans its whole grid
    return (d * q + m).reshape(K, N)


def matmul_model(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = create_session(ir.from_proto(model), optimization="disable_all")
    return np.asarray(session.run({"x": x})["y"])


def test_blocks_round_trip_exactly_on_the_grid():
    w = q4_1_weight()
    q, d, z, r = int4_affine.quantize_block(w, BLOCK)
    back = d[:, None] * (q.astype(np.float32) - z[:, None]) + r[:, None]
    assert np.abs(back.reshape(K, N) - w).max() < 1e-6
    assert q.max() == 15 and z.max() <= 15


def test_lowered_matmul_matches_and_rtn_does_not():
    w = q4_1_weight(1)
    x = np.random.default_rng(2).standard_normal((2, 3, K)).astype(np.float32)
    want = x @ w
    lowered, names = int4_affine.lower(matmul_model(w), block_size=BLOCK, accuracy_level=0)
    assert names == ["proj"]
    ops = [n.op_type for n in lowered.graph.node]
    assert ops == ["MatMulNBits", "MatMul", "MatMul", "Add"]  # grid, block sums, offsets
    assert "w" not in {i.name for i in lowered.graph.initializer}
    onnx.checker.check_model(lowered)
    assert np.abs(run(lowered, x) - want).max() < 1e-4

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rtn = MatMulNBitsQuantizer(matmul_model(w), block_size=BLOCK, is_symmetric=False)
    rtn.process()
    assert np.abs(run(rtn.model.model, x) - want).max() > 1e-2  # the offsets it drops


def test_excluded_nodes_are_left():
    w = q4_1_weight(3)
    kept, names = int4_affine.lower(
        matmul_model(w), block_size=BLOCK, accuracy_level=0, exclude_nodes=["proj"]
    )
    assert names == [] and [n.op_type for n in kept.graph.node] == ["MatMul"]


def test_a_weight_whose_k_is_not_a_block_multiple_is_left():
    w = np.ones((40, N), np.float32)
    graph = matmul_model(np.zeros((K, N), np.float32))
    graph.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    graph.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 40
    _, names = int4_affine.lower(graph, block_size=BLOCK, accuracy_level=0)
    assert names == []


def test_shared_activation_and_a_transposed_weight():
    """Two MatMuls on one activation share its block sums; a weight read as Transpose of an
    initializer (a tied lm_head reads the embedding so) is lowered and the Transpose goes."""
    w, e = q4_1_weight(4), q4_1_weight(5).T.copy()  # e: (N, K), used as e^T
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="a"),
            helper.make_node("Transpose", ["e"], ["et"], name="t"),
            helper.make_node("MatMul", ["x", "et"], ["z"], name="b"),
            helper.make_node("Gather", ["e", "ids"], ["g"], name="embed"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "z", "g")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(e, "e")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    lowered, names = int4_affine.lower(model, block_size=BLOCK, accuracy_level=0)
    ops = [n.op_type for n in lowered.graph.node]
    assert names == ["a", "b"] and "Transpose" not in ops
    assert ops.count("MatMul") == 3  # one block-sum MatMul for x, one offsets MatMul each
    assert {i.name for i in lowered.graph.initializer} >= {"e"}  # the Gather still reads it
    x = np.random.default_rng(6).standard_normal((1, 2, K)).astype(np.float32)
    session = create_session(ir.from_proto(lowered), optimization="disable_all")
    out = session.run({"x": x, "ids": np.array([0, 3], np.int64)})
    assert np.abs(np.asarray(out["z"]) - x @ e.T).max() < 1e-4
    assert np.abs(np.asarray(out["y"]) - x @ w).max() < 1e-4
    assert np.array_equal(np.asarray(out["g"]), e[[0, 3]])


def test_eight_bit_blocks_for_chosen_nodes():
    """Off-grid weights: 8-bit blocks round 17x finer than 4-bit ones."""
    w = np.random.default_rng(7).standard_normal((K, N)).astype(np.float32) * 0.05
    x = np.random.default_rng(8).standard_normal((2, 3, K)).astype(np.float32)
    errors = {}
    for bits, wide in ((4, []), (8, ["proj"])):
        lowered, _ = int4_affine.lower(
            matmul_model(w), block_size=BLOCK, accuracy_level=0, eight_bit_nodes=wide
        )
        node = next(n for n in lowered.graph.node if n.op_type == "MatMulNBits")
        assert next(a.i for a in node.attribute if a.name == "bits") == bits
        errors[bits] = np.abs(run(lowered, x) - x @ w).max()
    assert errors[8] * 10 < errors[4], errors


def test_the_output_projection_is_the_one_named_for_eight_bits():
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="inner"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="head"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])],
        [
            numpy_helper.from_array(np.ones((K, K), np.float32), "w"),
            numpy_helper.from_array(np.ones((K, N), np.float32), "w2"),
        ],
    )
    assert int4_affine.output_projections(helper.make_model(graph)) == ["head"]
