"""Both zoo jobs on a real local Ray cluster (pipeline/executors.py): the scripts start their
own cluster and give the local executor's results; on a cluster this module starts once
(2 CPUs), a killed worker is run again and the retry recorded, a worker that always dies
fails only its model, a failing model does not stop the others, and a task no node could
hold fails at once instead of waiting forever.

The fake exports are functions of this module; the cluster's workers import it by name,
so the fixture puts this folder on their PYTHONPATH.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import onnx
import pytest
import ray
from onnx import TensorProto, helper

from models import batch
from models import kinds as model_kinds
from pipeline import ci_gate, executors

ROOT = Path(__file__).resolve().parents[1]
ZOO = "resnet,mobilenet"


# --------------------------------------------------------------------------- the scripts


def _script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "scripts" / name), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def local_ci(tmp_path_factory) -> Path:
    """The CI job on the tiny zoo with the local executor: the results Ray must give."""
    out = tmp_path_factory.mktemp("local")
    assert ci_gate.main(["--tiny", "--models", ZOO, "--out", str(out)]) == 0
    return out


def _results(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["results"]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["models"]


def test_both_scripts_on_a_cluster_they_start_match_the_local_executor(local_ci, tmp_path):
    """The acceptance commands, as a user types them (no cluster is running: each script
    starts one). The CI job finds the batch export's files up to date and optimizes them."""
    models = tmp_path / "models"
    done = _script(
        "batch_export.py", "--models", ZOO, "--tiny", "--executor", "ray", "--out", str(models)
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    done = _script(
        "ci_optimize.py", "--tiny", "--models", ZOO, "--executor", "ray", "--out", str(tmp_path)
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]

    local, on_ray = _manifest(local_ci / "models"), _manifest(models)
    for name in ZOO.split(","):
        assert on_ray[name]["status"] == "skipped"  # the CI job found batch_export's file
        assert on_ray[name]["sha256"] == local[name]["sha256"]  # the same file, byte for byte
        assert on_ray[name]["nodes"] == local[name]["nodes"]
        assert local[name]["execution"]["executor"] == "local"
        assert on_ray[name]["execution"]["executor"] == "ray"
    expected = {r["model"]: r for r in _results(local_ci)}
    rows = _results(tmp_path)
    assert sorted(r["model"] for r in rows) == sorted(expected)
    for row in rows:
        want = expected[row["model"]]
        assert (row["status"], row["nodes_after"], row["verdict"]) == (
            want["status"],
            want["nodes_after"],
            want["verdict"],
        )
        assert row["rolled_back"] == want["rolled_back"] == []
        for step in ("export", "optimize"):
            placement = row["execution"][step]
            assert placement["executor"] == "ray" and placement["attempts"] == 1
            assert placement["node_id"] and placement["task_id"] and placement["node"]
        assert row["execution"]["optimize"]["pid"] != row["execution"]["export"]["pid"]
        assert want["execution"]["optimize"]["executor"] == "local"


def test_an_unreachable_cluster_is_one_clear_line(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    argv = ["--models", "resnet", "--executor", "ray", "--address", address]
    # Ray alone would retry an unreachable address for minutes; the check answers at once.
    done = _script("batch_export.py", *argv, "--out", str(tmp_path), timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: cannot reach the Ray cluster at {address}: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "manifest.json").exists()


# --------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def cluster() -> str:
    """One local cluster for the tests below, started once (seconds) and shut down after;
    its address, for a script to join with ``--address``."""
    patch = pytest.MonkeyPatch()
    here = str(Path(__file__).parent)
    patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    context = ray.init(num_cpus=2, include_dashboard=False)
    patch.undo()
    yield context.address_info["gcs_address"]
    ray.shutdown()


def test_address_joins_a_running_cluster(cluster, local_ci, tmp_path):
    argv = ["--models", "resnet", "--tiny", "--executor", "ray", "--address", cluster]
    done = _script("batch_export.py", *argv, "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    record = _manifest(tmp_path)["resnet"]
    assert record["execution"]["node_id"] == ray.get_runtime_context().get_node_id()
    assert record["sha256"] == _manifest(local_ci / "models")["resnet"]["sha256"]


@dataclasses.dataclass
class FakeExport:
    exporter: str = "fake"
    validation: dict = dataclasses.field(default_factory=lambda: {"passed": True})


def faulty_export(name, path, *, exporter=None, opset=17, tiny=False):
    """``killed_once`` kills its worker on its first attempt, ``always_killed`` on every
    attempt, ``broken`` raises; the others write a one-node model."""
    marker = Path(path).parent / f".{name}.attempted"
    if name == "always_killed" or (name == "killed_once" and not marker.exists()):
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "broken":
        raise RuntimeError("broken: cannot export")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph), path)
    return FakeExport()


def _bounded(call, seconds: float = 120.0):
    """``call()``'s value; a failure, not a hung suite, when it has not returned in time (an
    endless retry or a task no node can place would wait forever)."""
    result = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"no result after {seconds:g} s (or it raised: see the thread's traceback)"
    return result[0]


def _export(out: Path, names: list[str], retries: int) -> dict:
    return _bounded(
        lambda: batch.export_all(
            names, out, executor="ray", retries=retries, export_fn=faulty_export, progress=False
        )
    )


@pytest.fixture
def fake_zoo(monkeypatch):
    names = ["alpha", "beta", "killed_once", "always_killed", "broken"]
    monkeypatch.setattr(batch, "known_models", lambda: names)


def test_a_killed_worker_is_retried_and_the_retry_recorded(cluster, fake_zoo, tmp_path):
    manifest = _export(tmp_path, ["killed_once", "alpha"], retries=1)
    record = manifest["models"]["killed_once"]
    assert record["status"] == "ok", record["error"]
    placement = record["execution"]
    assert placement["executor"] == "ray" and placement["attempts"] == 2
    (lost,) = placement["lost_attempts"]
    assert lost.startswith("WorkerCrashedError:")
    assert manifest["models"]["alpha"]["execution"]["attempts"] == 1
    assert batch.exit_code(manifest) == 0
    assert batch.closing_lines(manifest) == [
        f"retried: killed_once: 1 of 2 attempt(s) on ray lost, then ran: {lost}"
    ]
    again = _export(tmp_path, ["killed_once", "alpha"], retries=1)  # up to date: skipped
    assert again["models"]["killed_once"]["execution"] == placement  # the run that made it
    assert batch.closing_lines(again) == []  # an earlier run's retry is not this run's


def test_a_worker_that_always_dies_fails_its_model_only(cluster, fake_zoo, tmp_path):
    manifest = _export(tmp_path, ["always_killed", "alpha", "broken", "beta"], retries=1)
    models = manifest["models"]
    assert {n: r["status"] for n, r in models.items()} == {
        "always_killed": "failed",
        "alpha": "ok",
        "broken": "failed",
        "beta": "ok",
    }
    dead = models["always_killed"]
    assert dead["error"].startswith("worker crashed (WorkerCrashedError:")
    assert dead["execution"]["attempts"] == 2 and len(dead["execution"]["lost_attempts"]) == 2
    assert models["broken"]["error"] == "RuntimeError: broken: cannot export"
    assert models["broken"]["execution"]["attempts"] == 1  # an exception is not retried
    assert batch.exit_code(manifest) == 1
    assert batch.closing_lines(manifest)[-1] == "failed (2/4): always_killed, broken"
    assert json.loads((tmp_path / "manifest.json").read_text())["models"] == models


def test_a_task_no_node_can_hold_fails_at_once(cluster):
    outcomes = []
    huge = executors.Work(
        "huge", len, ("abc",), memory=1 << 40
    )  # 1 TiB (1 << 50 overflows in Ray and runs!)
    small = executors.Work("small", len, ("abc",))
    run = executors.Executor("ray").run
    _bounded(lambda: run([huge, small], lambda item, got: outcomes.append((item, got))))
    got = {item.name: outcome for item, outcome in outcomes}
    assert got["small"].value == 3 and got["small"].placement["executor"] == "ray"
    assert got["huge"].value is None and got["huge"].placement["attempts"] == 0
    assert got["huge"].error.startswith("asks for 1024.0 GiB of memory; the largest Ray node")


def test_the_ci_job_on_ray_isolates_a_failing_model_and_names_it(cluster, tmp_path, capsys):
    """The optimize step on Ray: a baseline recorded there, then one model file is damaged:
    the other model still passes, the damaged one is a regression named in the summary;
    an injected broken pass is registered in the Ray workers too, and rolled back there."""
    folder = tmp_path / "models"
    folder.mkdir()
    entries = {}
    for name in ("float_mlp", "paddle_ocr"):
        onnx.save(getattr(model_kinds, name)(), folder / f"{name}.onnx")
        entries[name] = {"status": "ok", "file": f"{name}.onnx"}
    (folder / "manifest.json").write_text(json.dumps({"models": entries}))
    common = ["--manifest", str(folder / "manifest.json"), "--executor", "ray"]
    common += ["--baseline", str(tmp_path / "baseline.json")]
    assert ci_gate.main([*common, "--update-baseline", "--out", str(tmp_path / "a")]) == 0

    (folder / "paddle_ocr.onnx").write_bytes(b"not a model")
    summary = tmp_path / "summary.md"
    code = ci_gate.main([*common, "--out", str(tmp_path / "b"), "--summary", str(summary)])
    assert code == 1
    rows = {r["model"]: r for r in _results(tmp_path / "b")}
    assert rows["float_mlp"]["status"] == "ok" and rows["float_mlp"]["verdict"] == "pass"
    assert rows["paddle_ocr"]["status"] == "error" and rows["paddle_ocr"]["verdict"] == "regression"
    for row in rows.values():
        assert row["execution"]["optimize"]["executor"] == "ray"
        assert row["execution"]["export"] is None  # files named by a manifest, not exported here
    assert "REGRESSION paddle_ocr/default: status error (baseline ok)" in capsys.readouterr().err
    assert "| paddle_ocr | default | error |" in summary.read_text()

    code = ci_gate.main([*common, "--out", str(tmp_path / "c"), "--inject-broken-pass", "evil"])
    assert code == 1
    rows = {r["model"]: r for r in _results(tmp_path / "c")}
    assert rows["float_mlp"]["rolled_back"] == ["evil"]
    assert "evil" not in ci_gate.REGISTRY


class _DeadWorkers:
    """An executor whose every worker dies: what ``Executor.run`` reports then."""

    def run(self, items, on_done):
        lost = ["WorkerCrashedError: killed", "WorkerCrashedError: killed"]
        for item in items:
            where = dict.fromkeys(("node", "node_id", "task_id", "pid"))
            placement = {"executor": "ray", **where, "attempts": 2, "lost_attempts": lost}
            on_done(item, executors.Outcome(None, placement, f"worker crashed ({lost[-1]})"))


def test_a_model_whose_workers_all_died_is_crashed_and_named(tmp_path):
    source = ci_gate.ModelSource("m", tmp_path / "m.onnx", execution={"executor": "local"})
    recipes = [ci_gate.load_recipe("default"), ci_gate.load_recipe("minimal")]
    rows = ci_gate._optimize_all([source], recipes, tmp_path, None, _DeadWorkers())
    assert [(r["recipe"], r["status"]) for r in rows] == [
        ("default", "crashed"),
        ("minimal", "crashed"),
    ]
    assert rows[0]["message"] == "worker crashed (WorkerCrashedError: killed)"
    assert rows[0]["execution"]["optimize"]["attempts"] == 2
    assert ci_gate.retry_notes(rows) == [
        "m, optimize: 2 of 2 attempt(s) on ray lost, no attempt finished: "
        "WorkerCrashedError: killed"
    ]
    assert ci_gate.compare_row(rows[0], {"models": {"m/default": {"status": "ok"}}}).regressions
