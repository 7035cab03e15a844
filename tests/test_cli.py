"""The CLI end to end, as a subprocess: success, exit codes, bad inputs, idempotence.

Every bad-input case must exit 2 with a one-line message and no traceback, leave nothing at
the output path, and leave the input byte-identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

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


def run_cli(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "optimize.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
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
    assert report["schema_version"] == "1.0"
    assert report["status"] == "ok" and report["exit_code"] == 0
    assert report["parity"]["passed"] is True
    assert report["output_model"]["nodes"] < report["input_model"]["nodes"]
    assert {p["name"] for p in report["passes"]} >= {"fold_constants", "remove_noops"}
    assert all(p["verification"] != "rolled_back" for p in report["passes"])
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


def _not_a_model_proto(path: Path) -> None:
    tensor = helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0])
    path.write_bytes(tensor.SerializeToString())


def _external_data_missing(path: Path) -> None:
    model = onnx.parser.parse_model(SMALL_MODEL)
    big = onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "w_big")
    model.graph.initializer.append(big)
    onnx.save(model, path, save_as_external_data=True, location="gone.data", size_threshold=0)
    (path.parent / "gone.data").unlink()


BAD_INPUTS = {
    "empty file": lambda p: p.write_bytes(b""),
    "random bytes": lambda p: p.write_bytes(bytes(range(256)) * 7),
    "text file": lambda p: p.write_text("this is not a model\n"),
    "protobuf that is not a model": _not_a_model_proto,
    "truncated protobuf": lambda p: p.write_bytes(
        onnx.parser.parse_model(SMALL_MODEL).SerializeToString()[:-40]
    ),
    "missing external data": _external_data_missing,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_files_exit_2_cleanly(case: str, tmp_path: Path) -> None:
    source = tmp_path / "in.onnx"
    BAD_INPUTS[case](source)
    before = source.read_bytes()
    out = tmp_path / "out.onnx"
    proc = run_cli(source, "-o", out)
    assert proc.returncode == 2, (case, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr
    assert not out.exists()
    assert source.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{dir}"], "directory"),
        (["{dir}/missing.onnx"], "not found"),
        (["{model}", "-o", "{model}"], "input path"),
        (["{model}", "-o", "/proc/out.onnx"], "cannot write"),
        (["{model}", "-o", "{dir}/no/such/folder/out.onnx"], "does not exist"),
        (["{model}", "--passes", "no_such_pass"], "unknown pass"),
        (["{model}", "--recipe", "no_such_recipe"], "unknown recipe"),
        (["{model}", "--input-shape", "x=2,four"], "--input-shape"),
        (["{model}", "--input-shape", "x=2,4,4"], "rank"),
        (["{model}", "--input-shape", "nope=2,4"], "unknown input"),
        (["{model}", "--rtol", "1"], "rtol"),
        (["{model}", "--output-tol", "y=1e-3"], "--output-tol"),
        (["{model}", "--output-tol", "nope=1e-3,1e-4"], "unknown output"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    args: list[str], message: str, small_model: Path, tmp_path: Path
) -> None:
    before = small_model.read_bytes()
    filled = [a.format(dir=tmp_path, model=small_model) for a in args]
    if "-o" not in filled:
        filled += ["-o", str(tmp_path / "out.onnx")]
    proc = run_cli(*filled)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert small_model.read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()


def test_bad_recipe_file_exits_2(small_model: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('passes = ["remove_dead", "fold_constants"]\n')
    proc = run_cli(small_model, "--recipe", recipe, "-o", tmp_path / "o.onnx")
    assert proc.returncode == 2
    assert "must come before" in proc.stderr


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
