"""models/batch.py (run by scripts/batch_export.py): manifest, resumability, failure
isolation, exit codes, atomicity.

Most tests inject a fake export function that writes a one-node ONNX model, so they run in
milliseconds in-process (``jobs=1``). The fakes are top-level functions so the process-pool
tests can pickle them into spawned workers too; a real tiny export runs once, at the end.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from models import batch as batch_export

ROOT = Path(__file__).resolve().parents[1]

NAMES = ["alpha", "beta", "gamma"]
RECORD_FIELDS = {
    "status",
    "file",
    "sha256",
    "opset",
    "nodes",
    "size_bytes",
    "export",
    "source",
    "folder",
    "key",
    "validation",
    "seconds",
    "error",
    "execution",
}


class FakeMismatch(RuntimeError):
    """Stands in for models.export.ExportMismatch."""


@dataclass
class FakeRecord:
    name: str
    path: Path
    exporter: str
    opset: int
    tiny: bool
    seconds: float = 0.0
    validation: dict = field(default_factory=lambda: {"passed": True, "summary": "fake"})


CALLS: list[str] = []


def fake_export(name, path, *, exporter=None, opset=17, tiny=False):
    """Write a one-node Identity model; ``broken`` mismatches, ``crash`` kills its process."""
    CALLS.append(name)
    if name == "broken":
        raise FakeMismatch("broken: ONNX output 'y' differs from PyTorch\n(max abs error 3.5)")
    if name == "crash":
        os._exit(3)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name=name)],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return FakeRecord(name, Path(path), exporter or "torch-legacy", opset, tiny)


def failing_validation_export(name, path, **kwargs):
    record = fake_export(name, path, **kwargs)
    record.validation = {"passed": False, "summary": "cosine 0.2"}
    return record


@pytest.fixture(autouse=True)
def fake_zoo(monkeypatch):
    CALLS.clear()
    zoo = [*NAMES, "broken", "crash"]
    monkeypatch.setattr(batch_export, "known_models", lambda: list(zoo))
    monkeypatch.setattr(batch_export, "default_export_fn", lambda: fake_export)


def run(out, names=NAMES, **kwargs):
    kwargs.setdefault("jobs", 1)
    kwargs.setdefault("progress", False)
    return batch_export.export_all(names, out, export_fn=fake_export, **kwargs)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# --------------------------------------------------------------------------- manifest


def test_manifest_has_every_documented_field(tmp_path):
    run(tmp_path, ["alpha", "beta"], opset=18, tiny=True)
    manifest = read_manifest(tmp_path)
    assert list(manifest) == ["schema_version", "created", "versions", "models"]
    assert manifest["schema_version"] == "1.1"
    assert datetime.datetime.fromisoformat(manifest["created"]).tzinfo is not None
    assert set(manifest["versions"]) == {
        "torch",
        "transformers",
        "optimum",
        "onnx",
        "onnxruntime",
        "python",
    }
    assert manifest["versions"]["onnx"] == onnx.__version__
    assert list(manifest["models"]) == ["alpha", "beta"]
    for name, record in manifest["models"].items():
        assert set(record) == RECORD_FIELDS
        path = tmp_path / record["file"]
        assert record["file"] == f"{name}.onnx"
        assert record["status"] == "ok" and record["error"] is None
        assert record["sha256"] == sha(path)
        assert record["size_bytes"] == path.stat().st_size
        assert record["opset"] == 18 and record["nodes"] == 1
        assert record["export"] == {"exporter": "torch-legacy", "opset": 18, "tiny": True}
        assert record["validation"] == {"passed": True, "summary": "fake"}
        assert len(record["key"]) == 64 and record["source"] == "zoo"
        assert isinstance(record["seconds"], float)
        execution = record["execution"]
        assert execution["executor"] == "local" and execution["pid"] == os.getpid()
        assert execution["attempts"] == 1 and execution["lost_attempts"] == []
        assert execution["task_id"] is None and execution["node"]
    assert manifest["models"]["alpha"]["key"] != manifest["models"]["beta"]["key"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_key_depends_on_every_input():
    versions = {
        "torch": "2.5",
        "transformers": "4.5",
        "optimum": "2",
        "onnx": "1",
        "onnxruntime": "1",
    }
    base = batch_export.export_key("a", "torch-legacy", 17, False, versions)
    variants = [
        batch_export.export_key("b", "torch-legacy", 17, False, versions),
        batch_export.export_key("a", "torch-dynamo", 17, False, versions),
        batch_export.export_key("a", "torch-legacy", 18, False, versions),
        batch_export.export_key("a", "torch-legacy", 17, True, versions),
        batch_export.export_key("a", "torch-legacy", 17, False, {**versions, "torch": "2.6"}),
        batch_export.export_key("a", "torch-legacy", 17, False, {**versions, "onnxruntime": "2"}),
        batch_export.export_key("a", "torch-legacy", 17, False, versions, "folderhash"),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert base == batch_export.export_key("a", "torch-legacy", 17, False, dict(versions))


# --------------------------------------------------------------------------- resumability


def test_second_run_skips_everything_and_touches_nothing(tmp_path):
    run(tmp_path)
    first = read_manifest(tmp_path)
    stamps = {n: (tmp_path / f"{n}.onnx").stat().st_mtime_ns for n in NAMES}
    CALLS.clear()
    run(tmp_path)
    assert CALLS == []
    second = read_manifest(tmp_path)
    for name in NAMES:
        assert (tmp_path / f"{name}.onnx").stat().st_mtime_ns == stamps[name]
        assert second["models"][name] == {**first["models"][name], "status": "skipped"}
    # a third run still treats "skipped" records as up to date, with worker processes too
    # (nothing to do: no pool is started, an empty one would not start)
    run(tmp_path, jobs=2)
    assert CALLS == []


def test_changed_file_is_re_exported(tmp_path):
    run(tmp_path)
    target = tmp_path / "beta.onnx"
    model = onnx.load(target)
    model.graph.node[0].name = "edited"
    onnx.save(model, target)
    CALLS.clear()
    run(tmp_path)
    assert CALLS == ["beta"]
    statuses = {n: r["status"] for n, r in read_manifest(tmp_path)["models"].items()}
    assert statuses == {"alpha": "skipped", "beta": "ok", "gamma": "skipped"}


def test_deleted_file_is_re_exported(tmp_path):
    run(tmp_path)
    (tmp_path / "gamma.onnx").unlink()
    CALLS.clear()
    run(tmp_path)
    assert CALLS == ["gamma"]


@pytest.mark.parametrize("change", [{"opset": 18}, {"tiny": True}, {"exporter": "torch-dynamo"}])
def test_changed_key_re_exports(tmp_path, change):
    run(tmp_path)
    CALLS.clear()
    run(tmp_path, **change)
    assert CALLS == NAMES


def test_new_library_version_re_exports(tmp_path, monkeypatch):
    run(tmp_path)
    real = batch_export.package_versions()
    monkeypatch.setattr(batch_export, "package_versions", lambda: {**real, "torch": "99.0"})
    CALLS.clear()
    run(tmp_path)
    assert CALLS == NAMES
    assert read_manifest(tmp_path)["versions"]["torch"] == "99.0"


def test_force_re_exports(tmp_path):
    run(tmp_path)
    CALLS.clear()
    run(tmp_path, force=True)
    assert CALLS == NAMES
    assert {r["status"] for r in read_manifest(tmp_path)["models"].values()} == {"ok"}


def test_failed_model_is_retried_and_other_records_are_kept(tmp_path):
    run(tmp_path, ["alpha", "broken"])
    CALLS.clear()
    run(tmp_path, ["broken", "beta"])
    assert CALLS == ["broken", "beta"]
    models = read_manifest(tmp_path)["models"]
    assert list(models) == ["broken", "beta", "alpha"]  # alpha was not in this run: kept
    assert models["alpha"]["status"] == "ok"


# --------------------------------------------------------------------------- failures


def test_failure_is_isolated_and_recorded(tmp_path):
    manifest = run(tmp_path, ["alpha", "broken", "beta"])
    assert CALLS == ["alpha", "broken", "beta"]
    assert batch_export.exit_code(manifest) == 1
    broken = read_manifest(tmp_path)["models"]["broken"]
    assert broken["status"] == "failed"
    assert broken["error"] == (
        "FakeMismatch: broken: ONNX output 'y' differs from PyTorch (max abs error 3.5)"
    )
    assert broken["file"] is None and broken["sha256"] is None and broken["validation"] == {}
    assert not (tmp_path / "broken.onnx").exists()
    for name in ("alpha", "beta"):
        assert read_manifest(tmp_path)["models"][name]["status"] == "ok"


def test_validation_not_passed_is_a_failure(tmp_path):
    manifest = batch_export.export_all(
        ["alpha"], tmp_path, jobs=1, progress=False, export_fn=failing_validation_export
    )
    record = manifest["models"]["alpha"]
    assert record["status"] == "failed"
    assert "validation did not pass" in record["error"] and "cosine 0.2" in record["error"]


def test_cli_exit_codes(tmp_path, capsys):
    out = str(tmp_path / "zoo")
    assert batch_export.main(["--models", "alpha,beta", "--out", out, "--jobs", "1"]) == 0
    assert batch_export.main(["--models", "alpha,beta", "--out", out, "--jobs", "1"]) == 0
    assert batch_export.main(["--models", "alpha,broken", "--out", out, "--jobs", "1"]) == 1
    captured = capsys.readouterr()
    assert "\nfailed (1/2): broken\nmanifest: " in captured.out
    assert "[2/2] broken: failed" in captured.out or "[1/2] broken: failed" in captured.out
    assert batch_export.main(["--models", "alpha,nope", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model(s): nope" in err
    assert "nope" not in read_manifest(tmp_path / "zoo")["models"]


def test_progress_lines_when_not_a_tty(tmp_path, capsys):
    run(tmp_path, ["alpha", "broken"], progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[1/2] alpha: ok")
    assert lines[1].startswith("[2/2] broken: failed") and "FakeMismatch" in lines[1]


def test_bad_usage_exit_2(tmp_path, capsys):
    assert batch_export.main(["--folders", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        batch_export.main(["--out", str(tmp_path)])
    assert exc.value.code == 2
    capsys.readouterr()
    argv = ["--models", "alpha", "--out", str(tmp_path / "o")]
    assert batch_export.main([*argv, "--address", "head:6379"]) == 2
    assert capsys.readouterr().err == "error: --address needs --executor ray\n"
    with pytest.raises(SystemExit) as exc:
        batch_export.main([*argv, "--retries", "-1"])
    assert exc.value.code == 2 and "must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ray_executor_without_ray_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # ``import ray`` raises ImportError
    argv = ["--models", "alpha", "--executor", "ray", "--address", "auto", "--out", str(tmp_path)]
    assert batch_export.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "error: ray is not installed: pip install 'onnx-verified-optimizer[ray]'"
    )


def test_unknown_name_end_to_end_subprocess(tmp_path):
    script = ROOT / "scripts" / "batch_export.py"
    argv = [sys.executable, str(script), "--models", "no_such_model", "--out", str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: unknown model(s): no_such_model")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "manifest.json").exists()


# --------------------------------------------------------------------------- atomicity


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    run(tmp_path, ["alpha"])
    before = (tmp_path / "manifest.json").read_bytes()

    def dump_half_then_die(obj, handle, **kwargs):
        handle.write(json.dumps(obj)[:20])
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_export.json, "dump", dump_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, ["beta"])
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.onnx", "manifest.json"]


def test_unreadable_manifest_starts_over(tmp_path):
    (tmp_path / "manifest.json").write_text('{"models": {"alpha": ')
    run(tmp_path, ["alpha"])
    assert read_manifest(tmp_path)["models"]["alpha"]["status"] == "ok"


# --------------------------------------------------------------------------- process pool


def test_process_pool_isolates_a_crashing_worker(tmp_path):
    manifest = run(tmp_path, ["alpha", "crash", "beta", "broken", "gamma"], jobs=2)
    statuses = {n: r["status"] for n, r in manifest["models"].items()}
    assert statuses == {
        "alpha": "ok",
        "crash": "failed",
        "beta": "ok",
        "broken": "failed",
        "gamma": "ok",
    }
    crash = manifest["models"]["crash"]
    assert crash["error"].startswith("worker process crashed (")
    assert crash["execution"]["attempts"] == 1 + batch_export.executors.DEFAULT_RETRIES
    assert crash["execution"]["pid"] is None
    for name in ("alpha", "beta", "gamma"):  # any victim of the broken pool ran again alone
        execution = manifest["models"][name]["execution"]
        assert execution["pid"] != os.getpid() and execution["attempts"] == 1 + len(
            execution["lost_attempts"]
        )
    assert manifest["models"]["broken"]["error"].startswith("FakeMismatch:")
    assert batch_export.exit_code(manifest) == 1
    assert read_manifest(tmp_path)["models"] == manifest["models"]
    lines = batch_export.closing_lines(manifest)
    assert lines[-1] == "failed (2/5): crash, broken"
    assert "retried: crash: 3 of 3 attempt(s) on local lost, no attempt finished: " in "\n".join(
        lines
    )


def test_worker_limits_torch_threads(tmp_path, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    task = batch_export.Task("alpha", str(tmp_path), None, 17, False, "k", single_thread=True)
    name, record = batch_export.export_one(task, fake_export)
    assert record["status"] == "ok" and os.environ["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow
def test_real_tiny_export_in_worker_processes(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    export = pytest.importorskip("models.export")
    monkeypatch.setattr(batch_export, "known_models", export.list_models)
    names = ["bert_base", "resnet"]
    manifest = batch_export.export_all(names, tmp_path, tiny=True, jobs=2, progress=False)
    for name in names:
        record = manifest["models"][name]
        assert record["status"] == "ok", record["error"]
        assert record["validation"]["passed"] is True
        assert record["sha256"] == sha(tmp_path / f"{name}.onnx")
        assert record["nodes"] > 10 and record["export"]["tiny"] is True
        onnx.checker.check_model(str(tmp_path / f"{name}.onnx"))
    again = batch_export.export_all(names, tmp_path, tiny=True, jobs=2, progress=False)
    assert {r["status"] for r in again["models"].values()} == {"skipped"}


# --------------------------------------------------------------------------- --folders


@pytest.fixture
def tiny_bert_folder(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("optimum.exporters.onnx")
    from transformers import BertConfig, BertModel

    folder = tmp_path / "tiny-bert"
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )
    BertModel(config).eval().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_folder_export_validates_skips_and_tracks_weights(tiny_bert_folder, tmp_path):
    out = tmp_path / "out"
    manifest = batch_export.export_all([], out, folders=[tiny_bert_folder], progress=False)
    record = manifest["models"]["tiny-bert"]
    assert record["status"] == "ok", record["error"]
    assert record["source"] == "folder" and record["folder"] == str(tiny_bert_folder)
    assert record["validation"] == {"passed": True, "tool": "optimum", "task": "feature-extraction"}
    assert record["export"]["exporter"] == "optimum" and record["nodes"] > 50
    onnx.checker.check_model(str(out / "tiny-bert.onnx"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tiny-bert.onnx"]
    again = batch_export.export_all([], out, folders=[tiny_bert_folder], progress=False)
    assert again["models"]["tiny-bert"]["status"] == "skipped"
    # new weights in the folder: new key, re-exported
    weights = tiny_bert_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes: still up to date
    assert (
        batch_export.export_all([], out, folders=[tiny_bert_folder], progress=False)["models"][
            "tiny-bert"
        ]["status"]
        == "skipped"
    )
    from transformers import BertModel

    BertModel.from_pretrained(tiny_bert_folder).eval().save_pretrained(
        tiny_bert_folder, safe_serialization=False
    )
    weights.unlink()
    third = batch_export.export_all([], out, folders=[tiny_bert_folder], progress=False, jobs=1)
    assert third["models"]["tiny-bert"]["status"] == "ok"
    assert third["models"]["tiny-bert"]["key"] != record["key"]


def test_folder_export_mismatch_is_a_failure(tiny_bert_folder, tmp_path, monkeypatch):
    """Optimum only logs its tolerance failures; batch export must turn them into failures."""
    import optimum.exporters.onnx.convert as convert
    from optimum.exporters.error_utils import AtolError

    def mismatch(**kwargs):
        raise AtolError("values not close enough, max diff: 0.5 (atol: 1e-05)")

    monkeypatch.setattr(convert, "validate_models_outputs", mismatch)
    out = tmp_path / "out"
    manifest = batch_export.export_all(  # in-process: the patch must reach the export
        [], out, folders=[tiny_bert_folder], progress=False, jobs=1
    )
    record = manifest["models"]["tiny-bert"]
    assert record["status"] == "failed"
    assert record["error"].startswith("ExportMismatch:") and "max diff: 0.5" in record["error"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
