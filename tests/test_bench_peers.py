"""pipeline/bench/peers.py (scripts/bench_peers.py): each tool in its own subprocess,
failures recorded verbatim.

A tiny model and a few tools: onnxscript (a real peer), ``ort-transformers`` (not applicable
to a model without a Hugging Face config: no subprocess), and tools of our own given as
``module:function`` that copy the model, change its numbers, raise, crash the interpreter
or hang. The run must go on past every failure and say what each one was.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import onnx
import pytest

from pipeline.bench import doc_sections, peers

ROOT = Path(__file__).resolve().parents[1]


MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
tiny (float[N, 4] x) => (float[N, 4] y) <float[4, 4] w = {1,0,0,0, 0,2,0,0, 0,0,3,0, 0,0,0,4}>
{
    a = Identity(x)
    m = MatMul(a, w)
    b = Identity(m)
    y = Relu(b)
}
"""

CUSTOM_TOOLS = """
import os
import shutil
import sys
import time

import onnx


def copy(src, dst):
    shutil.copyfile(src, dst)


def wrong(src, dst):
    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Neg"
    onnx.save(model, str(dst))


def broken(src, dst):
    raise ValueError("peer exploded: cannot fuse node 'm'\\nsecond line is not shown")


def crash(src, dst):
    print("Traceback (most recent call last):", file=sys.stderr)
    print("FatalError: the native library gave up", file=sys.stderr)
    sys.stderr.flush()
    os._exit(3)


def hang(src, dst):
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("peers")
    path = folder / "tiny.onnx"
    onnx.save(onnx.parser.parse_model(MODEL), str(path))
    (folder / "peer_tools_for_test.py").write_text(textwrap.dedent(CUSTOM_TOOLS))
    return path


@pytest.fixture(scope="module")
def run(tiny: Path, tmp_path_factory) -> dict:
    """One run of the script over the tiny model; returns the JSON and the docs text."""
    folder = tmp_path_factory.mktemp("run")
    doc = folder / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept before\n\n<!-- other:begin -->\nx\n<!-- other:end -->\n")
    tools = ["onnxscript", "ort-transformers"] + [
        f"peer_tools_for_test:{name}" for name in ("copy", "wrong", "broken", "crash")
    ]
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(tiny.parent))
    try:
        argv = [str(tiny), "--tools", ",".join(tools), "--repeats", "2", "--timeout", "120"]
        argv += ["--json", str(folder / "r.json"), "--write", "--doc", str(doc)]
        assert peers.main(argv) == 0
    finally:
        mp.undo()
    return {"json": json.loads((folder / "r.json").read_text()), "doc": doc.read_text()}


def _rows(run: dict) -> dict[str, dict]:
    (result,) = run["json"]["results"]
    return {row["tool"].split(":")[-1]: row for row in result["rows"]}


def test_rows_in_order_with_nodes_parity_and_latency(run: dict) -> None:
    (result,) = run["json"]["results"]
    assert result["nodes_before"] == 4
    assert [r["tool"].split(":")[-1] for r in result["rows"]] == [
        "onnxscript",
        "ort-transformers",
        "copy",
        "wrong",
        "broken",
        "crash",
    ]
    rows = _rows(run)
    assert rows["onnxscript"]["status"] == "ok"
    assert rows["onnxscript"]["evaluation"]["nodes_after"] == 2  # both Identity nodes gone
    assert rows["copy"]["evaluation"]["nodes_after"] == 4
    for name in ("onnxscript", "copy"):
        evaluation = rows[name]["evaluation"]
        assert evaluation["parity"]["max_abs_diff"] == 0.0
        assert evaluation["latency"]["rounds"] == 2
        assert evaluation["latency"]["ratio"] > 0
        assert rows[name]["seconds"] >= 0
    # Relu -> Neg: the parity column must show the damage, not a pass.
    assert rows["wrong"]["evaluation"]["parity"]["max_abs_diff"] > 0.1


def test_failures_are_recorded_verbatim_and_the_run_goes_on(run: dict) -> None:
    rows = _rows(run)
    assert rows["broken"]["status"] == "failed"
    assert rows["broken"]["error"] == "ValueError: peer exploded: cannot fuse node 'm'"
    assert "evaluation" not in rows["broken"]
    assert rows["crash"]["status"] == "crashed"
    assert rows["crash"]["error"] == "crashed (exit 3): FatalError: the native library gave up"
    assert rows["ort-transformers"]["status"] == "not applicable"
    assert "no Hugging Face config" in rows["ort-transformers"]["error"]


def test_markdown_table_and_docs_section(run: dict) -> None:
    doc = run["doc"]
    begin, end = doc_sections.markers(peers.SECTION)
    assert doc.count(begin) == 1 and doc.count(end) == 1
    assert doc.startswith("# Benchmarks\n\nkept before\n")
    assert "<!-- other:begin -->\nx\n<!-- other:end -->" in doc
    section = doc.split(begin, 1)[1].split(end, 1)[0]
    assert "Command: `python scripts/bench_peers.py " in section
    assert "onnxruntime 1." in section and "cores" in section
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    by_tool = {line.split(" | ")[0][2:].split(":")[-1]: line for line in lines[1:]}
    assert "| graph | " in by_tool["onnxscript"] and "4 → 2" in by_tool["onnxscript"]
    assert "max abs 0" in by_tool["copy"]
    assert by_tool["broken"].endswith("| failed: ValueError: peer exploded: cannot fuse node 'm' |")
    assert "second line" not in section


def test_hanging_tool_times_out(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(tiny.parent))
    job = {
        "tool": "peer_tools_for_test:hang",
        "src": str(tiny),
        "dst": str(tmp_path / "out.onnx"),
        "result": str(tmp_path / "result.json"),
    }
    result = peers._child("--child-tool", job, tmp_path / "job.json", timeout=5, threads=1)
    assert result == {"status": "timeout", "error": "timeout after 5 s"}


def test_replace_section() -> None:
    text = "# T\n\nmine\n"
    once = doc_sections.replace_section(text, "k", "body 1", "## K")
    assert once == "# T\n\nmine\n\n## K\n\n<!-- k:begin -->\nbody 1\n<!-- k:end -->\n"
    twice = doc_sections.replace_section(once + "after\n", "k", "body 2", "## K")
    assert twice == "# T\n\nmine\n\n## K\n\n<!-- k:begin -->\nbody 2\n<!-- k:end -->\nafter\n"
    with pytest.raises(ValueError, match="no matching"):
        doc_sections.replace_section("<!-- k:begin -->\n", "k", "x", "## K")


def test_meaningful_line_prefers_the_exception() -> None:
    stderr = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\nwarning: later\n"
    assert peers.meaningful_line(stderr) == "RuntimeError: boom"
    assert peers.meaningful_line("just this\n\n") == "just this"
    assert peers.meaningful_line("") == ""
