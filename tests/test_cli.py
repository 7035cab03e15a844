"""The CLI end to end, as a subprocess: success paths, reports, idempotence.

Bad input (every row of docs/bad-inputs.md) is in test_bad_inputs.py; reports, help and the
console's stderr in test_reports.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]

SMALL_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 4] x) => (float[batch, 4] y) {
  shape = Constant<value = int64[2] {2, 2}>()
  w = ConstantOfShape<value = float[1] {0.5}>(shape)
  wt = Transpose<perm = [1, 0]>(w)
  i = Identity(x)
  d = Dropout(i)
  m = Mul(d, d)
  c = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
  a = Add(m, c)
  y = Relu(a)
}
"""


def run_cli(
    *args: str | Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python optimize.py ARGS`` as a user runs it (shared by the CLI test files)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "optimize.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    path = tmp_path / "small.onnx"
    onnx.save(onnx.parser.parse_model(SMALL_MODEL), path)
    return path


def test_success_writes_model_and_report(small_model: Path, tmp_path: Path) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = run_cli(small_model, "-o", out, "--report", report_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["schema_version"] == "2.0"
    assert report["status"] == "ok" and report["exit_code"] == 0
    assert report["parity"]["passed"] is True
    assert report["output_model"]["nodes"] < report["input_model"]["nodes"]
    # Applications that changed the model are listed in full, the others collapsed by name.
    changed = {p["name"] for p in report["passes"]}
    assert changed == {"lift_constants", "remove_noops", "remove_dead"}
    assert all(p["modified"] for p in report["passes"])
    idle = {row["name"]: row["runs"] for row in report["passes_unchanged"]}
    assert idle["fold_constants"] >= 1 and "lift_constants" in idle  # its second, idle run
    optimized = onnx.load(out)
    onnx.checker.check_model(optimized, full_check=True)
    assert [n.op_type for n in optimized.graph.node] == ["Mul", "Add", "Relu"]


def test_idempotent_and_deterministic(small_model: Path, tmp_path: Path) -> None:
    first, second, again = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    assert run_cli(small_model, "-o", first, "-q").returncode == 0
    assert run_cli(small_model, "-o", second, "-q").returncode == 0
    assert first.read_bytes() == second.read_bytes()
    proc = run_cli(first, "-o", again, "-q", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert again.read_bytes() == first.read_bytes()
    report = json.loads((tmp_path / "r.json").read_text())
    assert not any(p["modified"] for p in report["passes"])


def test_user_inputs_are_used(small_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, x=np.ones((5, 4), dtype=np.float32))
    report_path = tmp_path / "r.json"
    proc = run_cli(
        small_model, "-o", tmp_path / "o.onnx", "--inputs", data, "--report", report_path
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["inputs"]["source"] == "user"
    assert report["inputs"]["sets"] == [{"x": {"shape": [5, 4], "dtype": "float32"}}]


def test_external_data_model_is_optimized_and_its_folder_left_clean(tmp_path: Path) -> None:
    # ONNX Runtime refuses external data reached through links outside the model's folder;
    # verification must still run, and leave no temporary file beside the user's data.
    model = onnx.parser.parse_model(SMALL_MODEL)
    weight = onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "w_ext")
    model.graph.initializer.append(weight)
    model.graph.node.append(helper.make_node("Add", ["y", "w_ext"], ["z"]))
    model.graph.output[0].name = "z"
    folder = tmp_path / "in"
    folder.mkdir()
    source = folder / "ext.onnx"
    onnx.save(model, source, save_as_external_data=True, location="ext.data", size_threshold=0)
    listing = sorted(p.name for p in folder.iterdir())
    out = tmp_path / "out.onnx"
    proc = run_cli(source, "-o", out, "--no-speed-check", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["parity"]["passed"]
    assert any(p["verification"] == "passed" for p in report["passes"])
    assert sorted(p.name for p in folder.iterdir()) == listing


@pytest.mark.parametrize("where", ["missing_folder/report.json", "."])
def test_a_bad_report_path_exits_2_before_the_run(small_model: Path, tmp_path: Path, where):
    out = tmp_path / "out.onnx"
    report = tmp_path / where
    proc = run_cli(small_model, "-o", out, "--report", report)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--report" in proc.stdout + proc.stderr
    assert not out.exists()  # nothing ran, nothing was written


def test_report_and_model_files_are_ordinary_files(small_model: Path, tmp_path: Path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    old = os.umask(0o022)
    try:
        assert run_cli(small_model, "-o", out, "--report", report).returncode == 0
    finally:
        os.umask(old)
    assert report.stat().st_mode & 0o777 == 0o644
