"""A wheel built from the repository, installed NON-editable in a fresh venv, runs
``onnx-optimize``: an editable install hides a package left out of the wheel (it happened:
``pipeline.quantization`` was missing and every plain ``pip install .`` failed on import).

No network: the wheel is built with the setuptools already installed
(``--no-build-isolation``) and installed ``--no-deps``; the fresh venv sees the test
environment's third-party packages through a ``.pth`` path line, which adds a directory to
``sys.path`` without running that directory's own ``.pth`` hooks, so the editable install of
this repository stays invisible and ``pipeline`` can only come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(*cmd: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


# What a wheel is built from. Copied to a clean directory first: setuptools reuses an
# in-tree build/ directory, whose leftovers would hide a package the wheel no longer gets.
SOURCES = ("pyproject.toml", "README.md", "pipeline", "graph_passes", "models")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    done = _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        out,
        source,
        cwd=source,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("*.whl")
    return path


def test_the_wheel_carries_every_package_and_the_recipes(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {
        str(init.parent.relative_to(ROOT))
        for top in ("pipeline", "graph_passes", "models")
        for init in (ROOT / top).rglob("__init__.py")
    }
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"packages left out of the wheel: {missing}"
    assert "pipeline/recipes/default.toml" in names


def test_a_plain_install_runs_the_console_script(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "plain"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = _run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
    ).stdout.strip()
    # third-party packages of this environment, as a plain path (no .pth hooks run)
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel, cwd=tmp_path
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    where = _run(python, "-c", "import pipeline; print(pipeline.__file__)", cwd=tmp_path)
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout + where.stderr

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Identity", ["x"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, tmp_path / "m.onnx")

    done = _run(
        env_dir / "bin" / "onnx-optimize",
        "m.onnx",
        "-o",
        "m.opt.onnx",
        "--no-speed-check",
        "--report",
        "report.json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    optimized = onnx.load(tmp_path / "m.opt.onnx")
    assert [n.op_type for n in optimized.graph.node] == ["Relu"]
    assert (tmp_path / "report.json").is_file()
