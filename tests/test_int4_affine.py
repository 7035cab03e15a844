"""int4 that keeps grid weights (pipeline/quantization/int4_affine.py): a Q4_1 grid carried to
the offset blocks' rounding, a Q8_0 grid exactly, and what ORT's integer-zero-point RTN loses
on the same weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from pipeline.quantization import int4_affine
from pipeline.runtime.sessions import create_session

K, N, BLOCK = 128, 48, 32


def q4_1_weight(seed: int = 0, k: int = K) -> np.ndarray:
    """A weight on GGUF's Q4_1 grid: per 32-block along K and column, w = d * q + m, each
    block straddling 0 as a trained model's do."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.005, 0.05, (k // BLOCK, 1, N)).astype(np.float32)
    m = -d * rng.uniform(0.0, 15.0, (k // BLOCK, 1, N)).astype(np.float32)
    q = rng.integers(0, 16, (k // BLOCK, BLOCK, N)).astype(np.float32)
    q[:, 0], q[:, 1] = 0, 15  # every block spans its whole grid
    return (d * q + m).reshape(k, N)


def matmul_model(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", w.shape[0]])],
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


@pytest.mark.parametrize("k", [K, 33 * BLOCK])  # 4 blocks: one offset block; 33: two
def test_lowered_matmul_matches_and_rtn_does_not(k):
    w = q4_1_weight(1, k)
    x = np.random.default_rng(2).standard_normal((2, 3, k)).astype(np.float32)
    want = x @ w
    lowered, names = int4_affine.lower(matmul_model(w), block_size=BLOCK, accuracy_level=0)
    assert names == ["proj"]
    ops = [n.op_type for n in lowered.graph.node]
    assert ops == ["MatMul", "Concat", "MatMulNBits"]  # block sums, A widened, one kernel
    node = lowered.graph.node[-1]
    extra = int4_affine.offset_rows(k // BLOCK, BLOCK)
    assert {a.name: a.i for a in node.attribute}["K"] == k + extra == k + BLOCK * (1 + k // 1024)
    assert "w" not in {i.name for i in lowered.graph.initializer}
    onnx.checker.check_model(lowered)
    ours = np.abs(run(lowered, x) - want).max()

    rtn = MatMulNBitsQuantizer(matmul_model(w), block_size=BLOCK, is_symmetric=False)
    rtn.process()
    dropped = np.abs(run(rtn.model.model, x) - want).max()  # the offsets RTN drops
    assert ours * 10 < dropped and ours < 0.02 * np.abs(want).max(), (ours, dropped)


def test_offsets_carried_to_their_rounding():
    """With the offsets' rows exact (a weight whose every r is 0 or one shared value per
    column), the lowering is exact: what is left above is only the offsets' own rounding."""
    w = q4_1_weight(9)
    q, d, z, _ = int4_affine.quantize_block(w, BLOCK)
    on_integer_grid = (d[:, None] * (q.astype(np.float32) - z[:, None])).reshape(K, N)
    x = np.random.default_rng(10).standard_normal((2, 3, K)).astype(np.float32)
    lowered, _ = int4_affine.lower(
        matmul_model(on_integer_grid), block_size=BLOCK, accuracy_level=0
    )
    assert np.abs(run(lowered, x) - x @ on_integer_grid).max() < 1e-4


def test_one_signed_blocks_widen_the_grid_to_zero():
    """A block that does not straddle 0 gets a grid that does, so its offset stays within
    half a step (the offset rows' rounding scales with the largest offset of a column)."""
    w = np.random.default_rng(12).uniform(0.1, 0.3, (K, N)).astype(np.float32)
    _, d, _, r = int4_affine.quantize_block(w, BLOCK)
    assert np.all(np.abs(r) <= d / 2 + 1e-7)
    x = np.random.default_rng(13).standard_normal((2, 3, K)).astype(np.float32)
    lowered, _ = int4_affine.lower(matmul_model(w), block_size=BLOCK, accuracy_level=0)
    error = np.abs(run(lowered, x) - x @ w).max()
    rtn = MatMulNBitsQuantizer(matmul_model(w), block_size=BLOCK, is_symmetric=False)
    rtn.process()  # its grid includes 0 too: plain rounding, the same size of error
    assert error < 1.5 * np.abs(run(rtn.model.model, x) - x @ w).max(), error


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


def tied_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """Two MatMuls on one activation, one reading its weight as Transpose of an initializer
    that a Gather reads too (an LM's tied embedding and lm_head); and the two weights."""
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
    return model, w, e


def test_shared_activation_and_a_transposed_weight():
    """Two MatMuls on one activation share its block sums; a weight read as Transpose of an
    initializer (a tied lm_head reads the embedding so) is lowered and the Transpose goes."""
    model, w, e = tied_model()
    lowered, names = int4_affine.lower(model, block_size=BLOCK, accuracy_level=0)
    ops = [n.op_type for n in lowered.graph.node]
    assert names == ["a", "b"] and "Transpose" not in ops
    assert (ops.count("MatMul"), ops.count("Concat")) == (1, 1)  # x widened once for both
    assert {i.name for i in lowered.graph.initializer} >= {"e"}  # the Gather still reads it
    x = np.random.default_rng(6).standard_normal((1, 2, K)).astype(np.float32)
    session = create_session(ir.from_proto(lowered), optimization="disable_all")
    out = session.run({"x": x, "ids": np.array([0, 3], np.int64)})
    scale = np.abs(x @ w).max()
    assert np.abs(np.asarray(out["z"]) - x @ e.T).max() < 0.02 * scale
    assert np.abs(np.asarray(out["y"]) - x @ w).max() < 0.02 * scale
    assert np.array_equal(np.asarray(out["g"]), e[[0, 3]])


def test_weights_left_on_disk_are_read_one_at_a_time_and_stay_there(tmp_path):
    """A model loaded without its external data (a large one) is lowered reading each weight
    from ``weights_dir``; the initializer it leaves alone (the embedding the Gather reads)
    stays a reference to the data file, and the result is the in-memory lowering's."""
    on_disk, _, _ = tied_model()  # onnx.save moves its tensors out of the message
    onnx.save(on_disk, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    structure = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    lazy, names = int4_affine.lower(
        structure, block_size=BLOCK, accuracy_level=0, weights_dir=tmp_path
    )
    eager, _ = int4_affine.lower(tied_model()[0], block_size=BLOCK, accuracy_level=0)
    assert names == ["a", "b"]
    kept = {i.name: i for i in lazy.graph.initializer}
    assert kept["e"].data_location == TensorProto.EXTERNAL
    assert all(i.data_location != TensorProto.EXTERNAL for n, i in kept.items() if n != "e")
    onnx.save(lazy, tmp_path / "lowered.onnx")  # beside the data file it still reads
    reloaded = onnx.load(str(tmp_path / "lowered.onnx"))
    assert reloaded.graph.node == eager.graph.node
    want = {i.name: numpy_helper.to_array(i) for i in eager.graph.initializer}
    got = {i.name: numpy_helper.to_array(i) for i in reloaded.graph.initializer}
    assert want.keys() == got.keys()
    assert all(np.array_equal(got[name], want[name]) for name in want)


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


def test_eight_bit_blocks_carry_a_q8_0_grid_exactly():
    """GGUF's Q8_0 (symmetric, w = d * q, q in -127..127; SmolLM2's tied embedding): exact,
    with no offset rows."""
    rng = np.random.default_rng(11)
    d = rng.uniform(1e-3, 1e-2, (K // BLOCK, 1, N)).astype(np.float32)
    q = rng.integers(-127, 128, (K // BLOCK, BLOCK, N)).astype(np.float32)
    q[:, 0] = 127  # the block's absmax sets d
    w = (d * q).reshape(K, N)
    lowered, _ = int4_affine.lower(
        matmul_model(w), block_size=BLOCK, accuracy_level=0, eight_bit_nodes=["proj"]
    )
    assert [n.op_type for n in lowered.graph.node] == ["MatMulNBits"]
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    assert np.abs(run(lowered, x) - x @ w).max() < 1e-4


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
