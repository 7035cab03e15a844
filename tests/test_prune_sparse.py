"""2:4 sparsity (``--prune sparse=2:4``) on tiny models built here: which weights take the
pattern and which stay dense, the pattern as saved, the activation-aware choice, the
interface, the CLI and the TensorRT flag (without a GPU: the options builder)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline import providers
from pipeline.pruning import sparse, spec
from tests.test_cli import run_cli
from tests.test_prune import _calibration, _save, build, feeds, run

HIDDEN, SEQ, VOCAB = 16, 6, 50


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _lm(seed: int = 0) -> onnx.ModelProto:
    """ids -> Gather(E) -> x; x -> MatMul(wa [16, 32]) -> Relu -> MatMul(wb [32, 16]) -> + x;
    -> MatMul(wc [16, 6]) -> Relu -> MatMul(wd [6, 16]) (K = 6) -> + ; -> MatMul(wl) = logits.
    Eligible: wa, wb, wc. Dense: E (a Gather), wd (K = 6), wl (the logits producer)."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("E", rng.standard_normal((VOCAB, HIDDEN))),
        _init("wa", rng.standard_normal((HIDDEN, 32)) / 4),
        _init("wb", rng.standard_normal((32, HIDDEN)) / 6),
        _init("wc", rng.standard_normal((HIDDEN, 6)) / 4),
        _init("wd", rng.standard_normal((6, HIDDEN)) / 3),
        _init("wl", rng.standard_normal((HIDDEN, VOCAB)) / 4),
    ]
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="up"),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("MatMul", ["ar", "wb"], ["b"], name="down"),
        helper.make_node("Add", ["x", "b"], ["r1"]),
        helper.make_node("MatMul", ["r1", "wc"], ["c"], name="narrow_up"),
        helper.make_node("Relu", ["c"], ["cr"]),
        helper.make_node("MatMul", ["cr", "wd"], ["d"], name="narrow_down"),
        helper.make_node("Add", ["r1", "d"], ["r2"]),
        helper.make_node("MatMul", ["r2", "wl"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "lm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", SEQ, VOCAB])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _ids(count: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, VOCAB, (2, SEQ), dtype=np.int64)} for _ in range(count)]


def _groups(sets):
    return lambda _session: [sets]


def _weight(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    init = {i.name: i for i in model.graph.initializer}
    return numpy_helper.to_array(init[node.input[1] if node.op_type != "Gather" else node.input[0]])


def _groups_nonzero(array: np.ndarray) -> np.ndarray:
    """Non-zeros per group of 4 consecutive rows of each column (the test's own count)."""
    rows, cols = array.shape
    return np.count_nonzero(array.reshape(rows // 4, 4, cols), axis=1)


def test_pattern_on_every_eligible_weight_of_the_saved_model_and_nothing_else(tmp_path):
    source = _lm()
    model = ir.from_proto(source)
    rows, dense = sparse.apply(model, _groups(_ids()))
    path = tmp_path / "sparse.onnx"
    ir.save(model, path)
    saved = onnx.load(str(path))
    assert [row["node"] for row in rows] == ["up", "down", "narrow_up"]
    assert {row["node"]: row["reason"].split()[0] for row in dense} == {
        "narrow_down": "reduction",
        "lm_head": "produces",
    }
    for name in ("up", "down", "narrow_up"):
        weight = _weight(saved, name)
        assert (_groups_nonzero(weight) == 2).all(), name  # exactly 2 of each 4 down K
        assert sparse.violations(weight, 0) == 0
    for name in ("embed", "narrow_down", "lm_head"):
        assert np.array_equal(_weight(saved, name), _weight(source, name)), name
    assert all(row["zeroed_share"] == 0.5 for row in rows)
    assert sparse.check_saved(ir.load(path), rows) == {
        "passed": True,
        "weights_checked": 3,
        "violations": {},
    }


def test_the_verifier_counts_a_group_with_three_nonzeros():
    weight = np.zeros((8, 3), np.float32)
    weight[0:2, 0] = 1.0
    assert sparse.violations(weight, 0) == 0
    weight[4:7, 2] = 1.0  # three of one group of four
    assert sparse.violations(weight, 0) == 1
    assert sparse.violations(weight.T, 1) == 1


def test_activation_aware_choice_keeps_the_weights_on_the_loud_channel():
    """Channel 0 of each group of four is ten times louder than the others, and its weights
    are the smallest: magnitude alone would zero them, ``|W| * ||x||`` keeps them (with the
    largest of the quiet ones), and the output error is smaller for it."""
    k, n = 8, 4
    weight = np.tile(np.array([[0.5], [1.0], [0.9], [0.2]], np.float32), (k // 4, n))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [_init("w", weight)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    rng = np.random.default_rng(3)
    scale = np.tile(np.array([10.0, 1.0, 1.0, 1.0], np.float32), k // 4)
    sets = [{"x": (rng.standard_normal((64, k)) * scale).astype(np.float32)} for _ in range(3)]
    model = ir.from_proto(proto)
    sparse.apply(model, _groups(sets))
    kept = np.nonzero(model.graph.node(0).inputs[1].const_value.numpy()[:4, 0])[0]
    assert kept.tolist() == [0, 1]
    x = np.concatenate([s["x"] for s in sets])
    ours = model.graph.node(0).inputs[1].const_value.numpy()
    magnitude = np.where(sparse.keep_mask(weight, np.ones(k)), weight, 0)
    assert np.linalg.norm(x @ (weight - ours)) < 0.5 * np.linalg.norm(x @ (weight - magnitude))


def test_gemm_with_transposed_weight_groups_along_its_second_axis():
    weight = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)  # [N, K]
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [_init("w", weight)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    model = ir.from_proto(proto)
    rows, _ = sparse.apply(model, _groups([{"x": np.ones((5, 8), np.float32)}]))
    assert rows[0]["axis"] == 1
    result = model.graph.node(0).inputs[1].const_value.numpy()
    assert (_groups_nonzero(result.T) == 2).all()


def test_interface_unchanged_and_onnx_runtime_runs_it():
    source = _lm(seed=5)
    model = ir.from_proto(source)
    sparse.apply(model, _groups(_ids()))
    proto = ir.to_proto(model)
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert [i.name for i in proto.graph.input] == ["ids"]
    feed = _ids(1, seed=9)[0]
    before, after = run(source, feed), run(proto, feed)
    assert after.shape == before.shape and np.isfinite(after).all()
    assert not np.allclose(after, before)  # the weights really changed


def test_spec_parsing():
    assert spec.parse("sparse=2:4") == spec.PruneSpec(sparse=True)
    both = spec.parse("sparse=2:4,ffn=0.2,layers=1")
    assert both.text == "layers=1,ffn=0.2,sparse=2:4" and both.shares == {"ffn": 0.2}
    with pytest.raises(ValueError, match="sparse accepts 2:4 only"):
        spec.parse("sparse=1:4")


def _resolution(name: str, options: dict[str, dict[str, str]] | None = None):
    return providers.Resolution(
        requested=[name],
        mode="list",
        resolved=name,
        fallback=False,
        reason="test",
        allow_fallback=False,
        probes=[],
        options=options or {},
    )


def test_tensorrt_gets_the_sparsity_flag_and_other_providers_a_plain_note():
    trt = _resolution("tensorrt")
    note = providers.flag_sparse_weights(trt)
    opts = trt.to_dict()["options"]["TensorrtExecutionProvider"]
    assert opts["trt_sparsity_enable"] == "True" and "fp16" in note
    assert ("TensorrtExecutionProvider", {"trt_sparsity_enable": "True"}) in (
        trt.session_providers()
    )
    own = providers.parse_provider_options(["trt_sparsity_enable=0", "trt_fp16_enable=1"])
    user = _resolution("tensorrt", {"TensorrtExecutionProvider": own})
    assert "will not use" in providers.flag_sparse_weights(user)
    assert user.options["TensorrtExecutionProvider"]["trt_sparsity_enable"] == "False"
    cpu = _resolution("cpu")
    assert "no speed-up on cpu" in providers.flag_sparse_weights(cpu)
    assert cpu.options == {}


@pytest.mark.parametrize("targets", ["sparse=2:4", "ffn=0.25,sparse=2:4"])
def test_cli_end_to_end(tmp_path, targets):
    src = _save(build("gelu", seed=2), tmp_path / "m.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    done = run_cli(
        src, "-o", out, "--report", report, "--no-speed-check", "--prune", targets,
        "--prune-max-drop", "0.5", "--calibration", _calibration(tmp_path / "calib"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    section = data["pruning"]
    assert section["targets"] == targets and section["final_check"]["passed"]
    sparsity = section["sparsity"]
    assert sparsity["pattern_check"]["passed"] and sparsity["totals"]["weights"] >= 2
    assert section["totals"]["sparse"] == sparsity["totals"]
    assert any("no speed-up on cpu" in w for w in data["warnings"])
    saved = onnx.load(str(out))
    initializers = {i.name: numpy_helper.to_array(i) for i in saved.graph.initializer}
    for row in sparsity["weights"]:
        assert (_groups_nonzero(initializers[row["weight"]]) <= 2).all(), row
    assert run(saved, feeds(1)[0]).shape == (3, SEQ, HIDDEN)
