"""Bad input, end to end: one table, every row run through the CLI as a subprocess.

Each row must exit with its documented code and a one-line ``error:`` message naming the
offending thing, print no traceback (unless ``--debug``), leave nothing at the output path
and no temporary debris in the output or input folder, and leave the input byte-identical.
docs/bad-inputs.md documents every row. Edge inputs that must NOT be
rejected (zero-size dimensions, an unknown custom-op domain with ``--allow-unverified``) and
a full disk (simulated in-process) are tested below the table.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import pytest
from onnx import TensorProto, helper

from pipeline import load
from pipeline.recipe import load_recipe
from pipeline.run import RunOptions, run
from pipeline.runtime.errors import EXIT_BAD_INPUT, UserError
from tests.test_cli import SMALL_MODEL, run_cli


def _small() -> onnx.ModelProto:
    return onnx.parser.parse_model(SMALL_MODEL)


def _save(model: onnx.ModelProto, path: Path, ir_version: int | None = 8) -> None:
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.save(model, path)


def _graph_model(nodes, outputs=("y",), opsets=(("", 17),), x_shape=(2, 4)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(x_shape)) for name in outputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def _tensor_proto(path: Path) -> None:
    tensor = helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0])
    path.write_bytes(tensor.SerializeToString())  # its wire types clash with ModelProto's


def _node_proto(path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    path.write_bytes(node.SerializeToString())  # parses as a ModelProto with no graph


def _external_data_missing(path: Path) -> None:
    model = _small()
    big = onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "w_big")
    model.graph.initializer.append(big)
    onnx.save(model, path, save_as_external_data=True, location="gone.data", size_threshold=0)
    (path.parent / "gone.data").unlink()


def _custom_op(path: Path) -> None:
    nodes = [
        helper.make_node("Add", ["x", "x"], ["a"]),
        helper.make_node("Identity", ["a"], ["b"]),
        helper.make_node("MyOp", ["b"], ["y"], domain="com.example"),
    ]
    _save(_graph_model(nodes, opsets=(("", 17), ("com.example", 1))), path)


def _newer_opset(path: Path) -> None:
    model = _small()
    model.opset_import[0].version = onnx.defs.onnx_opset_version()  # newer than ORT's
    _save(model, path)


def _newer_ir(path: Path) -> None:
    model = _graph_model([helper.make_node("Relu", ["x"], ["y"])])
    assert model.ir_version >= 14  # helper.make_model's default: newer than ORT 1.31's 13
    _save(model, path, ir_version=None)


def _cycle(path: Path) -> None:
    nodes = [
        helper.make_node("Add", ["x", "c"], ["a"], name="add_a"),
        helper.make_node("Relu", ["a"], ["c"], name="relu_c"),
        helper.make_node("Relu", ["a"], ["y"], name="relu_y"),
    ]
    _save(_graph_model(nodes), path)


def _duplicate_names(path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="first"),
        helper.make_node("Neg", ["x"], ["a"], name="second"),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    _save(_graph_model(nodes), path)


def _no_outputs(path: Path) -> None:
    _save(_graph_model([helper.make_node("Relu", ["x"], ["a"])], outputs=()), path)


def _ffn(path: Path) -> None:
    """x -> MatMul -> Relu -> MatMul: a feed-forward block to prune."""
    weights = [
        onnx.numpy_helper.from_array(np.full((4, 8), 0.1, np.float32), "w1"),
        onnx.numpy_helper.from_array(np.full((8, 4), 0.1, np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    model = _graph_model(nodes)
    model.graph.initializer.extend(weights)
    _save(model, path)


def _residual_ffn(path: Path) -> None:
    """``_ffn`` with its output added back to ``x``: one residual layer."""
    _ffn(path)
    model = onnx.load(str(path))
    model.graph.node[-1].output[0] = "f"
    model.graph.node.append(helper.make_node("Add", ["x", "f"], ["y"]))
    _save(model, path)


def _prune(message: str, spec: str | None, *more: str) -> Case:
    """A --prune case on the ``_ffn`` model."""
    flags = ("--prune", spec) if spec is not None else ()
    return Case(message, _ffn, args=("{model}", "-o", "{out}", *flags, *more))


def _fifo_output(tmp: dict[str, Path]) -> None:
    os.mkfifo(tmp["out"])


def _file_as_folder(tmp: dict[str, Path]) -> None:
    (tmp["outdir"] / "afile").write_text("not a folder\n")


def _symlink_to_input(tmp: dict[str, Path]) -> None:
    tmp["link"].symlink_to(tmp["model"])


def _bad_recipe(tmp: dict[str, Path]) -> None:
    tmp["recipe"].write_text('passes = ["remove_dead", "fold_constants"]\n')


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, the command line, and what the CLI must answer."""

    message: str  # must appear in the one error line
    build: Callable[[Path], None] = lambda p: _save(_small(), p)  # writes the input model
    args: tuple[str, ...] = ("{model}", "-o", "{out}")
    extra: Callable[[dict[str, Path]], None] | None = None  # more set-up (output side)
    code: int = EXIT_BAD_INPUT


CASES: dict[str, Case] = {
    # the input file itself
    "missing file": Case("input model not found", args=("{indir}/missing.onnx", "-o", "{out}")),
    "directory": Case("input is a directory", args=("{indir}", "-o", "{out}")),
    "empty file": Case("input model is an empty file", lambda p: p.write_bytes(b"")),
    "random bytes": Case(
        "not a readable ONNX model", lambda p: p.write_bytes(bytes(range(256)) * 7)
    ),
    "text file": Case("not a readable ONNX model", lambda p: p.write_text("not a model\n")),
    "truncated protobuf": Case(
        "not a readable ONNX model",
        lambda p: p.write_bytes(_small().SerializeToString()[:-40]),
    ),
    "protobuf that is not a model (a NodeProto)": Case("holds no ONNX graph", _node_proto),
    "protobuf that is not a model (a TensorProto)": Case(
        "not a readable ONNX model", _tensor_proto
    ),
    "missing external data": Case(
        "external data file missing for initializer 'w_big'", _external_data_missing
    ),
    # models that parse but are not valid
    "cyclic graph": Case("has a cycle through nodes Add 'add_a', Relu 'relu_c'", _cycle),
    "duplicate value names": Case(
        "value 'a' is written twice, by Relu node 'first' and by Neg node 'second'",
        _duplicate_names,
    ),
    "no outputs": Case("model graph has no outputs", _no_outputs),
    # models ONNX Runtime cannot run (see the --allow-unverified test below)
    "unknown custom-op domain": Case(
        "com.example:MyOp(-1) is not a registered function/op; outputs cannot be verified "
        "(re-run with --allow-unverified",
        _custom_op,
    ),
    "opset newer than ONNX Runtime": Case(
        f"imports opset {onnx.defs.onnx_opset_version()} of domain ai.onnx, newer than "
        "ONNX Runtime",
        _newer_opset,
    ),
    "IR version newer than ONNX Runtime": Case(
        "the model's IR version 14 is newer than ONNX Runtime", _newer_ir
    ),
    # flags that contradict the model or make no sense
    "input-shape not integers": Case(
        "--input-shape expects name=d0,d1",
        args=("{model}", "-o", "{out}", "--input-shape", "x=2,four"),
    ),
    "input-shape wrong rank": Case(
        "--input-shape x has rank 3, the model says rank 2",
        args=("{model}", "-o", "{out}", "--input-shape", "x=2,4,4"),
    ),
    "input-shape contradicts a fixed dim": Case(
        "--input-shape x: dimension 1 is 5, the model fixes it to 4",
        args=("{model}", "-o", "{out}", "--input-shape", "x=2,5"),
    ),
    "input-shape unknown input": Case(
        "--input-shape names unknown input(s) ['nope']",
        args=("{model}", "-o", "{out}", "--input-shape", "nope=2,4"),
    ),
    "unknown pass": Case(
        "unknown pass", args=("{model}", "-o", "{out}", "--passes", "no_such_pass")
    ),
    "retime without kernel timing": Case(
        "--retime needs kernel timing",
        args=("{model}", "-o", "{out}", "--retime", "--no-time-kernels"),
    ),
    "unknown recipe": Case(
        "unknown recipe", args=("{model}", "-o", "{out}", "--recipe", "no_such_recipe")
    ),
    "bad recipe file": Case(
        "must come before",
        args=("{model}", "-o", "{out}", "--recipe", "{recipe}"),
        extra=_bad_recipe,
    ),
    "permissive rtol": Case("rtol", args=("{model}", "-o", "{out}", "--rtol", "1")),
    "bad output-tol": Case(
        "--output-tol expects name=RTOL,ATOL",
        args=("{model}", "-o", "{out}", "--output-tol", "y=1e-3"),
    ),
    "output-tol unknown output": Case(
        "--output-tol names unknown output(s) nope",
        args=("{model}", "-o", "{out}", "--output-tol", "nope=1e-3,1e-4"),
    ),
    # the output path
    "output is the input": Case("output path is the input path", args=("{model}", "-o", "{model}")),
    "output is a symlink to the input": Case(
        "output path is the input path", args=("{model}", "-o", "{link}"), extra=_symlink_to_input
    ),
    "output folder missing": Case(
        "output folder does not exist", args=("{model}", "-o", "{outdir}/no/such/out.onnx")
    ),
    "output folder is a file": Case(
        "output folder is not a folder",
        args=("{model}", "-o", "{outdir}/afile/out.onnx"),
        extra=_file_as_folder,
    ),
    "output folder unwritable (/proc)": Case(
        "cannot write to output folder /proc", args=("{model}", "-o", "/proc/out.onnx")
    ),
    "output is a directory": Case("output path is a directory", args=("{model}", "-o", "{outdir}")),
    "output is not a regular file": Case(
        "output path exists and is not a regular file", extra=_fifo_output
    ),
    # pruning (pipeline/pruning)
    "prune fraction out of range": _prune(
        "--prune ffn=1.5: ffn fraction must be in (0, 1)", "ffn=1.5"
    ),
    "prune unknown target": _prune(
        "unknown pruning target 'bogus' (known: ffn, heads, layers, sparse)", "bogus=0.1"
    ),
    "prune sparse pattern other than 2:4": _prune(
        "--prune sparse=1:4: sparse accepts 2:4 only", "sparse=1:4"
    ),
    "prune sparse on a model with no eligible weight": Case(
        "--prune sparse: no weight takes the 2:4 pattern",
        args=("{model}", "-o", "{out}", "--prune", "sparse=2:4"),
    ),
    "prune layers not a whole number": _prune(
        "--prune layers=1.5: layers expects a whole number of layers, got '1.5'", "layers=1.5"
    ),
    "prune as many layers as the model has": Case(
        "--prune layers=1: the model has 1 layer(s); at most 0 can be removed",
        _residual_ffn,
        args=("{model}", "-o", "{out}", "--prune", "layers=1"),
    ),
    "prune layers of a model without residual layers": _prune(
        "--prune layers: no residual layer found", "layers=1"
    ),
    "prune budget without prune": _prune(
        "--prune-max-drop needs --prune", None, "--prune-max-drop", "0.1"
    ),
    "prune without calibration data": _prune(
        "--prune needs real data (--calibration DIR)", "ffn=0.2"
    ),
    "prune a model with no feed-forward block": Case(
        "--prune ffn: no feed-forward block found in this model",
        args=("{model}", "-o", "{out}", "--prune", "ffn=0.2"),
    ),
}


def _listing(folder: Path) -> dict[str, int]:
    """Every entry under ``folder`` (recursively) with its mode: debris shows up here."""
    return {str(p.relative_to(folder)): p.lstat().st_mode for p in sorted(folder.rglob("*"))}


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    outdir.mkdir()
    return {
        "indir": indir,
        "outdir": outdir,
        "model": indir / "in.onnx",
        "out": outdir / "out.onnx",
        "link": outdir / "link.onnx",
        "recipe": outdir / "recipe.toml",
    }


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_documented_exit_and_one_line(name: str, paths: dict[str, Path]) -> None:
    case = CASES[name]
    case.build(paths["model"])
    if case.extra is not None:
        case.extra(paths)
    before = paths["model"].read_bytes()
    listings = {key: _listing(paths[key]) for key in ("indir", "outdir")}
    out_existed = paths["out"].exists()
    args = [a.format(**paths) for a in case.args]

    proc = run_cli(*args)

    assert proc.returncode == case.code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert case.message in errors[0], proc.stderr
    assert paths["model"].read_bytes() == before
    assert {key: _listing(paths[key]) for key in ("indir", "outdir")} == listings
    if out_existed:  # the FIFO row: still the FIFO, not replaced by a model
        assert stat.S_ISFIFO(paths["out"].lstat().st_mode)
    else:
        assert not paths["out"].exists()
    assert not Path("/proc/out.onnx").exists()


def test_debug_shows_the_traceback(paths: dict[str, Path]) -> None:
    paths["model"].write_bytes(b"")
    proc = run_cli(paths["model"], "-o", paths["out"], "--debug")
    assert proc.returncode == EXIT_BAD_INPUT
    assert "Traceback" in proc.stderr and "input model is an empty file" in proc.stderr
    assert not paths["out"].exists()


def test_docs_document_every_row() -> None:
    table = (Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md").read_text()
    missing = [name for name in CASES if f"| {name} |" not in table]
    assert not missing, f"docs/bad-inputs.md lacks rows for {missing}"


# ---- edge inputs that must work -------------------------------------------------------------


def test_unknown_custom_op_is_optimized_around_with_allow_unverified(
    paths: dict[str, Path],
) -> None:
    _custom_op(paths["model"])
    report_path = paths["outdir"] / "r.json"
    proc = run_cli(
        paths["model"], "-o", paths["out"], "--allow-unverified", "--report", report_path
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["status"] == "ok" and report["parity"] is None
    assert any("verified by the ONNX checker only" in w for w in report["warnings"])
    assert {p["verification"] for p in report["passes"] if p["modified"]} == {"unverified"}
    optimized = onnx.load(paths["out"])
    assert [(n.domain, n.op_type) for n in optimized.graph.node] == [
        ("", "Add"),
        ("com.example", "MyOp"),
    ]


def test_zero_size_dim_from_input_shape_is_optimized(paths: dict[str, Path]) -> None:
    # ONNX Runtime runs empty tensors, so a 0-size dimension is a valid input: optimize it.
    _save(_small(), paths["model"])
    report_path = paths["outdir"] / "r.json"
    proc = run_cli(
        paths["model"], "-o", paths["out"], "--input-shape", "x=0,4", "--report", report_path
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["inputs"]["sets"][0] == {"x": {"shape": [0, 4], "dtype": "float32"}}
    assert report["parity"]["passed"] is True
    assert [n.op_type for n in onnx.load(paths["out"]).graph.node] == ["Mul", "Add", "Relu"]


def test_static_zero_size_dim_is_optimized(paths: dict[str, Path]) -> None:
    nodes = [
        helper.make_node("Add", ["x", "x"], ["a"]),
        helper.make_node("Identity", ["a"], ["b"]),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    _save(_graph_model(nodes, x_shape=(0, 4)), paths["model"])
    proc = run_cli(paths["model"], "-o", paths["out"], "--no-speed-check")
    assert proc.returncode == 0, proc.stderr
    optimized = onnx.load(paths["out"])
    onnx.checker.check_model(optimized, full_check=True)
    assert [n.op_type for n in optimized.graph.node] == ["Add", "Relu"]


# ---- a full disk (in-process: the save is made to fail) ---------------------------------------


@pytest.mark.parametrize("target", ["onnx_ir.save", "os.replace"])
def test_full_disk_is_a_user_error_and_leaves_nothing(
    target: str, paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(_small(), paths["model"])
    before = paths["model"].read_bytes()
    listing = _listing(paths["outdir"])
    calls = []

    def no_space(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.ENOSPC, "No space left on device")

    module, attribute = target.split(".")
    monkeypatch.setattr(onnx_ir if module == "onnx_ir" else os, attribute, no_space)
    options = RunOptions(
        input_path=paths["model"],
        output_path=paths["out"],
        recipe=load_recipe("default").with_overrides(speed_check=False),
    )
    with pytest.raises(UserError) as info:
        run(options, [])
    monkeypatch.undo()

    assert calls, "the save was never reached"
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert "No space left on device" in str(info.value) and str(paths["out"]) in str(info.value)
    assert "\n" not in str(info.value)
    assert not paths["out"].exists()
    assert _listing(paths["outdir"]) == listing
    assert paths["model"].read_bytes() == before


def test_save_model_refuses_a_missing_folder(tmp_path: Path) -> None:
    model = load.load_model(_write_small(tmp_path / "in.onnx"))
    with pytest.raises(UserError, match="output folder does not exist"):
        load.save_model(model, tmp_path / "nope" / "out.onnx")


def _write_small(path: Path) -> Path:
    _save(_small(), path)
    return path
