"""Killing the optimizer at any moment leaves the previous file or a complete new one.

The CLI runs as a subprocess on a model big enough (48 MB of weights) that saving takes a
while, with a different, valid model already at the output path. It is SIGKILLed at a fixed
early moment and at the first sign of the save (a staging folder appears in the output folder
or the output path changes), right away or a little later. Afterwards the output path must
hold the previous model byte for byte, or a complete model that ONNX Runtime runs with the
input model's results; with external data, model and data file must belong together.

A kill leaves its staging folder (``.tmp-*``, hidden) in the output folder and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.base import GraphPass

ROOT = Path(__file__).resolve().parents[1]
DIM = 2048
LAYERS = 3  # 3 x 16 MiB of float32 weights

_x = np.random.default_rng(1).standard_normal((1, DIM), dtype=np.float32)


def _build_input(path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(
            rng.standard_normal((DIM, DIM), dtype=np.float32) / np.float32(45), f"W{i}"
        )
        for i in range(LAYERS)
    ]
    nodes, previous = [], "x"
    for i in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [previous, f"W{i}"], [f"h{i}"]))
        previous = f"h{i}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))  # something to remove
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, DIM])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _write_previous(path: Path, external: bool) -> None:
    """A small, valid model that differs from any optimizer output."""
    bias = numpy_helper.from_array(np.full((1, DIM), 0.5, np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "previous",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, DIM])],
        [bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            location=path.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save(model, str(path))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _run_model(path: Path) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": _x})[0]


def _check_output(out: Path, previous: dict[str, bytes], expected: np.ndarray) -> str:
    """'previous' or 'new'; fails on anything partial, mismatched or stray."""
    folder = out.parent
    stray = [
        p.name
        for p in folder.iterdir()
        if not p.name.startswith((".tmp-", out.name))  # out.name*: its own data files
    ]
    assert not stray, f"unexpected files after the kill: {stray}"
    model_bytes = out.read_bytes() if out.exists() else None
    if model_bytes == previous[out.name]:
        for name, data in previous.items():  # the model's data must be the previous too
            assert (folder / name).read_bytes() == data, f"{name} changed under the old model"
        return "previous"
    assert model_bytes is not None, "output path is gone"
    onnx.checker.check_model(str(out), full_check=True)  # resolves external data by path
    np.testing.assert_allclose(_run_model(out), expected, rtol=1e-4, atol=1e-5)
    return "new"


def _kill_run(source: Path, out: Path, extra: list[str], delay: float | None) -> str:
    """Run the CLI; SIGKILL it ``delay`` s after the save shows (None: at 0.5 s).

    Returns what was seen when the kill was sent: 'early', 'saving' or 'exited'.
    """
    original = out.stat()
    command = [sys.executable, str(ROOT / "optimize.py"), str(source), "-o", str(out)]
    child = subprocess.Popen(
        [*command, "--no-speed-check", *extra],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if delay is None:
            time.sleep(0.5)
            seen = "early"
        else:
            deadline = time.monotonic() + 120
            seen = "exited"
            while child.poll() is None and time.monotonic() < deadline:
                staging = any(p.name.startswith(".tmp-") for p in out.parent.iterdir())
                now = out.stat() if out.exists() else None
                changed = now is None or (now.st_ino, now.st_size, now.st_mtime_ns) != (
                    original.st_ino,
                    original.st_size,
                    original.st_mtime_ns,
                )
                if staging or changed:
                    seen = "saving"
                    time.sleep(delay)
                    break
                time.sleep(0.001)
        if child.poll() is not None and seen != "saving":
            seen = "exited"
        os.kill(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    return seen


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("input") / "big.onnx"
    _build_input(path)
    return path, _run_model(path)


# (external data?, delay after the save shows; None = a fixed early kill)
SCENARIOS = [
    (False, None),
    (False, 0.0),
    (False, 0.03),
    (True, 0.0),
    (True, 0.01),
]


def test_kill_leaves_previous_or_complete_model(big_model, tmp_path):
    source, expected = big_model

    def scenario(i: int) -> tuple[str, str, list[str]]:
        external, delay = SCENARIOS[i]
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        out = folder / "out.onnx"
        _write_previous(out, external)
        previous = _snapshot(folder)
        seen = _kill_run(source, out, ["--external-data"] if external else [], delay)
        outcome = _check_output(out, previous, expected)
        debris = sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))
        return seen, outcome, debris

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(scenario, range(len(SCENARIOS))))
    seen = [r[0] for r in results]
    # The test only proves something if kills really landed inside the save (a poller
    # starved on a loaded machine may miss one short save, hence not all four).
    assert seen[0] == "early", results
    assert results[0][1] == "previous", results
    assert seen.count("saving") >= 3, results


def test_kill_debris_is_only_a_hidden_staging_folder(big_model, tmp_path):
    source, expected = big_model
    out = tmp_path / "out.onnx"
    _write_previous(out, external=True)
    previous = _snapshot(tmp_path)
    assert _kill_run(source, out, ["--external-data"], 0.0) == "saving"
    assert _check_output(out, previous, expected) == "previous"
    leftovers = [p for p in tmp_path.iterdir() if p.name not in previous]
    assert leftovers and all(p.is_dir() and p.name.startswith(".tmp-") for p in leftovers)


class _Crash(BaseException):
    """Stands in for SIGKILL inside the process: nothing after it runs."""


def test_crash_between_data_and_model_rename_keeps_a_consistent_pair(
    big_model, tmp_path, monkeypatch
):
    """Data files are named by content, so a crash after the data rename and before the
    model rename leaves the previous model with its previous data (plus an orphan file)."""
    from pipeline.load import load_model, save_model

    source, expected = big_model
    out = tmp_path / "out.onnx"
    _write_previous(out, external=True)
    previous = _snapshot(tmp_path)
    model = load_model(source)
    real_replace = os.replace
    calls = []

    def replace_then_crash(src, dst):  # the first rename INTO the output folder succeeds
        if Path(dst).parent == tmp_path:
            if calls:
                raise _Crash
            calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(_Crash):
        save_model(model, out, external_data=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls, "save_model renamed nothing"
    _check_output(out, previous, expected)


def test_temp_models_left_by_killed_runs_are_removed(tmp_path):
    """A run killed while ONNX Runtime loads a model with external data leaves a hidden
    ``.ovo-run-*`` model beside the user's data; the next session in that folder removes it
    when its process is gone, and leaves live or foreign ones alone."""
    import socket

    from pipeline.load import load_model
    from pipeline.runtime import sessions as runners

    _write_previous(tmp_path / "m.onnx", external=True)  # a model with external data
    model = load_model(tmp_path / "m.onnx")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".ovo-run-{host}-{dead.pid}-abc123.onnx"
    live = tmp_path / f".ovo-run-{host}-{os.getpid()}-def456.onnx"
    foreign = tmp_path / f".ovo-run-elsewhere-{dead.pid}-ghi789.onnx"
    for path in (stale, live, foreign):
        path.write_bytes(b"partial")
    session = runners.create_session(model)
    np.testing.assert_allclose(session.run({"x": _x})["y"], _x + 0.5)
    assert not stale.exists()
    assert live.exists() and foreign.exists()
    assert sorted(p.name for p in tmp_path.glob(".ovo-run-*")) == [foreign.name, live.name]


class _ReadAndDropWeights(GraphPass):
    """Reads every weight (as merge_duplicate_initializers does), then bypasses the first
    MatMul and deletes its weight, which then lives on only in the pass manager's snapshots."""

    name = "read_and_drop"

    def call(self, model):
        self.matches = 0
        for value in model.graph.initializers.values():
            float(value.const_value.numpy().sum())
        node = next((n for n in model.graph if n.op_type == "MatMul"), None)
        if node is not None and node.inputs[0].name == "x":
            weight = node.inputs[1]
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            model.graph.remove(node, safe=True)
            model.graph.initializers.pop(weight.name)
            self.matches = 1
        return self.result(model)


@pytest.mark.parametrize("mode", ["per-pass", "end"])
def test_passes_do_not_keep_weights_mapped(tmp_path, mode):
    """onnx-ir keeps a memory map (resident, in RSS) open for every external tensor a pass
    read, removed ones included; on a multi-GB model that doubled peak memory during
    verification. The pass manager closes them after each pass."""
    from pipeline.load import load_model
    from pipeline.pass_manager import VerifiedPassManager
    from pipeline.runtime.compare import Tolerance
    from pipeline.verify import Verifier

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((64, 64), dtype=np.float32), f"W{i}")
        for i in range(2)
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W0"], ["h"]),
            helper.make_node("MatMul", ["h", "W1"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        weights,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, size_threshold=0)
    model = load_model(tmp_path / "m.onnx")
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors)
    verifier = Verifier([], None, Tolerance(rtol=1e-5, atol=1e-6))
    manager = VerifiedPassManager(
        ["read_and_drop"], verifier, mode=mode, pass_factory=lambda name: _ReadAndDropWeights()
    )
    result = manager.run(model)
    assert [r.modified for r in result.records][:1] == [True]
    assert [t.raw for t in tensors] == [None, None]  # no mapping left open
    assert float(result.model.graph.initializers["W1"].const_value.numpy()[0, 0]) == float(
        numpy_helper.to_array(weights[1])[0, 0]
    )  # and still readable after
