"""A large model's weights go to disk once and stay memory-mapped (pipeline/runtime/
scratch_weights.py); sessions never serialize large in-memory tensors into a protobuf."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.bench import memory
from pipeline.load import file_sha256
from pipeline.quantization.stage import QuantizeOptions
from pipeline.recipe import load_recipe
from pipeline.run import RunOptions, run
from pipeline.runtime import scratch_weights, sessions
from pipeline.runtime.compare import Tolerance
from pipeline.runtime.errors import UserError

DIM = 32


def _chain(layers: int, dim: int = DIM, seed: int = 0) -> onnx.ModelProto:
    """x -> Identity -> (MatMul by W_i) * layers -> y, where W_0 is a Transpose of a constant
    (fold_constants turns it into a new in-memory weight) and the rest are initializers."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.standard_normal((dim, dim)).astype(np.float32) / dim, f"w{i}")
        for i in range(layers)
    ]
    nodes = [helper.make_node("Identity", ["x"], ["h0"])]
    nodes.append(helper.make_node("Transpose", ["w0"], ["w0t"], perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["h0", "w0t"], ["h1"]))
    for i in range(1, layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"h{layers}"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _options(source: Path, target: Path, **fields) -> RunOptions:
    recipe = load_recipe("default").with_overrides(speed_check=False)
    return RunOptions(input_path=source, output_path=target, recipe=recipe, **fields)


class _Stages:
    """A listener that lists the scratch folder's data files when each stage starts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data_files: dict[str, list[str]] = {}

    def stage(self, name: str) -> None:
        self.data_files[name] = sorted(p.name for p in self.folder.glob(".ovo-weights-*/*.data"))

    def record(self, record) -> None:
        pass


@pytest.fixture
def spill_everything(monkeypatch):
    monkeypatch.setattr(scratch_weights, "SPILL_FILE_BYTES", 1)


def test_a_large_model_runs_from_disk_and_its_scratch_folder_goes(tmp_path, spill_everything):
    source, target = tmp_path / "in.onnx", tmp_path / "out" / "out.onnx"
    target.parent.mkdir()
    onnx.save(_chain(4), source)
    before = file_sha256(source)
    stages = _Stages(target.parent)
    report = run(_options(source, target), [], stages)
    assert report.status == "ok"
    # The weights were in the scratch folder from the start; the folded W_0^T joined them
    # (a second data file) before the final verification's session.
    assert stages.data_files["reference run"] == ["weights-1.data"]
    assert stages.data_files["final verification"] == ["weights-1.data", "weights-2.data"]
    assert not list(target.parent.glob(".ovo-*")), "the scratch folder must be removed"
    assert file_sha256(source) == before
    saved = onnx.load(target, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in saved.graph.initializer)
    assert any("external data" in w for w in report.warnings)
    x = np.random.default_rng(1).standard_normal((3, DIM)).astype(np.float32)
    np.testing.assert_allclose(_outputs(target, x), _outputs(source, x), rtol=1e-5, atol=1e-6)


def test_no_external_data_still_writes_one_file(tmp_path, spill_everything):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_chain(3), source)
    report = run(_options(source, target, external_data=False), [])
    assert report.status == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]
    saved = onnx.load(target, load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in saved.graph.initializer)


def test_a_large_model_is_quantized_from_its_weights_on_disk(tmp_path, spill_everything):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_chain(3), source)
    lowered = QuantizeOptions(precision="int8-dynamic", max_drop=0.05)
    report = run(_options(source, target, quantize=lowered), [])
    assert report.status == "ok"
    assert report.quantization["final_check"]["passed"]
    saved = onnx.load(target)
    assert "MatMulInteger" in {n.op_type for n in saved.graph.node}
    assert not list(tmp_path.glob(".ovo-*"))


def test_a_failed_run_removes_the_scratch_folder_too(tmp_path, spill_everything):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_chain(3), source)
    stages = _Stages(tmp_path)
    options = _options(source, target, output_tolerances={"nope": Tolerance(1e-3, 1e-3)})
    with pytest.raises(UserError, match="unknown output"):
        run(options, [], stages)
    assert stages.data_files["reference run"] == ["weights-1.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_a_small_model_stays_in_memory(tmp_path):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_chain(3), source)
    stages = _Stages(tmp_path)
    assert run(_options(source, target), [], stages).status == "ok"
    assert not any(stages.data_files.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


def test_a_session_takes_large_in_memory_tensors_from_a_data_file(tmp_path, monkeypatch):
    # A model with external data (so its session is made from a file) plus a weight a pass
    # made in memory: the new weight reaches ONNX Runtime through a temporary data file, not
    # the protobuf, and the model keeps its own tensor object.
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save(_chain(3), folder / "m.onnx", save_as_external_data=True, location="m.data")
    model = ir.load(folder / "m.onnx")
    fresh = np.random.default_rng(2).standard_normal((DIM, DIM)).astype(np.float32)
    value = model.graph.initializers["w2"]
    value.const_value = ir.tensor(fresh, name="w2")
    kept = value.const_value
    monkeypatch.setattr(sessions, "SIDECAR_MIN_BYTES", 16)
    seen: list[str] = []
    real_open = sessions.open_session

    def spy(source, *args, **kwargs):
        seen.extend(p.name for p in folder.glob(".ovo-run-*.data"))
        proto = onnx.load(str(source), load_external_data=False)
        inline = [t.name for t in proto.graph.initializer if t.data_location != 1]
        assert inline == [], f"tensors serialized into the protobuf: {inline}"
        return real_open(source, *args, **kwargs)

    monkeypatch.setattr(sessions, "open_session", spy)
    session = sessions.create_session(model)
    assert len(seen) == 1
    assert value.const_value is kept
    assert sorted(p.name for p in folder.iterdir()) == ["m.data", "m.onnx"]
    x = np.random.default_rng(3).standard_normal((2, DIM)).astype(np.float32)
    weights = [numpy_helper.to_array(t) for t in _chain(3).graph.initializer]
    expected = x @ weights[0].T @ weights[1] @ fresh
    np.testing.assert_allclose(session.run({"x": x})["y"], expected, rtol=1e-4, atol=1e-5)


def test_a_scratch_folder_left_by_a_killed_run_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".ovo-weights-{host}-{dead.pid}-abc123"
    live = tmp_path / f".ovo-weights-{host}-{os.getpid()}-def456"
    foreign = tmp_path / f".ovo-weights-elsewhere-{dead.pid}-ghi789"
    for path in (stale, live, foreign):
        path.mkdir()
        (path / "weights-1.data").write_bytes(b"x")
    scratch = scratch_weights.ScratchWeights(tmp_path)
    mine = scratch.folder
    assert not stale.exists()
    assert live.exists() and foreign.exists() and mine.exists()
    scratch.close()
    assert not mine.exists()


def test_memory_benchmark_reports_peak_over_model_size(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    onnx.save(_chain(3), source)
    assert memory.main([str(source), "--", "--no-speed-check"]) == 0
    line = capsys.readouterr().out
    assert "peak RSS" in line and "x the model" in line
    assert memory.main([str(source), "--max-ratio", "1.0"]) == 1  # Python alone is more


@pytest.mark.slow
def test_a_300_mb_model_peaks_under_three_times_its_size(tmp_path):
    # Issue 15's bound on a model big enough to spill by default, default options: a chain
    # of 72 [1024, 1024] float32 MatMuls (302 MB inside one .onnx file).
    source = tmp_path / "big.onnx"
    onnx.save(_chain(72, dim=1024), source)
    assert source.stat().st_size > scratch_weights.SPILL_FILE_BYTES
    result = memory.measure(source, [], tmp_path)
    assert result["exit_code"] == 0, result["output_tail"]
    assert result["ratio"] <= 3.0, result
