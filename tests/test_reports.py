"""What a person sees, as a subprocess (issue 16): the three report formats, report paths
checked before any work, a clean stderr on a pipe, warnings once, help at 80 columns.

The console summary's exact text is in test_console_golden.py; the renderers' pieces in
tests/unit/test_render.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import onnx
import pytest

from models.kinds import float_mlp
from pipeline.recipe import load_recipe
from tests.test_cli import ROOT, SMALL_MODEL, run_cli

ANSI = re.compile(r"\x1b\[")
ORT_LOG = re.compile(r"\[[EWI]:onnxruntime")

# A Reshape to a fixed [2, 4]: the varied batch sizes the verifier tries make ONNX Runtime
# fail at run time, and it logs an error line (ANSI-coloured) before raising.
RESHAPE_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 4] x) => (float[2, 4] y) {
  s = Constant<value = int64[2] {2, 4}>()
  r = Reshape(x, s)
  y = Relu(r)
}
"""


def _save(text: str, path: Path) -> Path:
    onnx.save(onnx.parser.parse_model(text), path)
    return path


@pytest.fixture(scope="module")
def three_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run writing every format, under umask 027 so the modes are not the default."""
    folder = tmp_path_factory.mktemp("reports")
    model = _save(SMALL_MODEL, folder / "small.onnx")
    paths = {s: folder / f"r.{s}" for s in ("json", "md", "html")}
    old = os.umask(0o027)
    try:
        proc = run_cli(model, "-o", folder / "out.onnx", *(f"--report={p}" for p in paths.values()))
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    return {**paths, "out": folder / "out.onnx", "stderr": proc.stderr}


def test_every_report_format_is_written_with_the_models_mode(three_reports) -> None:
    mode = three_reports["out"].stat().st_mode & 0o777
    assert mode == 0o640
    for suffix in ("json", "md", "html"):
        assert three_reports[suffix].stat().st_mode & 0o777 == mode, suffix
    assert "report: " in three_reports["stderr"]


def test_report_json_starts_with_status_then_summary(three_reports) -> None:
    text = three_reports["json"].read_text()
    assert text.splitlines()[1] == '  "status": "ok",'
    report = json.loads(text)
    assert list(report)[:4] == ["status", "exit_code", "message", "summary"]
    assert list(report)[-2:] == ["passes", "passes_unchanged"]  # details last
    summary = report["summary"]
    assert summary["nodes"] == [9, 3]
    assert {"op": "Dropout", "before": 1, "after": 0} in summary["op_changes"]
    assert all(row["before"] != row["after"] for row in summary["op_changes"])
    assert summary["checks"][0]["words"] == "identical outputs on 2 input sets"
    assert len(text.splitlines()) < 400  # short lists on one line (was 938 for MiniLM)


def test_markdown_report_has_the_summary_tables(three_reports) -> None:
    text = three_reports["md"].read_text()
    assert text.startswith("## ✅ `small.onnx`: optimized and verified")
    assert "| nodes (all ops) | 9 | 3 |" in text
    assert "| Dropout | 1 | 0 |" in text
    assert "**graph passes (fp32)**: identical outputs on 2 input sets" in text
    assert "| lift_constants | passed | 9 -> 7 | 2 |" in text


class _Svgs(HTMLParser):
    """The titles of the inline SVG plots and anything that would load another file."""

    def __init__(self) -> None:
        super().__init__()
        self.titles: list[str] = []  # each plot's own title (not its bars' tooltips)
        self.external: list[str] = []
        self._wanted = self._capture = False

    def handle_starttag(self, tag, attrs):
        self._capture = self._wanted and tag == "title"
        self._wanted = tag == "svg"
        self.external += [v for k, v in attrs if k in ("src", "href") and v]
        if tag in ("script", "link", "img"):
            self.external.append(tag)

    def handle_endtag(self, tag):
        self._capture = False

    def handle_data(self, data):
        if self._capture:
            self.titles.append(data)


def test_html_report_is_self_contained_with_plots(three_reports) -> None:
    text = three_reports["html"].read_text()
    parser = _Svgs()
    parser.feed(text)
    assert parser.external == []
    assert parser.titles[:3] == [
        "Latency per round, original vs optimized",
        "Op counts before and after",
        "Max absolute error per output",
    ]
    for svg in re.findall(r"<svg .*?</svg>", text, re.S):
        root = ET.fromstring(svg)  # each plot is well-formed SVG
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert (
            len(root.findall(".//{http://www.w3.org/2000/svg}circle"))
            + len(root.findall(".//{http://www.w3.org/2000/svg}rect"))
            + len(root.findall(".//{http://www.w3.org/2000/svg}text"))
            > 3
        )
    latency = re.search(r"<svg .*?</svg>", text, re.S).group(0)
    assert latency.count("<circle") == 2 * 15  # one dot per round per model


def _bad_report_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "adir").mkdir()
    return {
        "unknown suffix": ([f"--report={tmp / 'r.txt'}"], "unknown format '.txt'"),
        "missing folder": ([f"--report={tmp / 'nope' / 'r.json'}"], "folder does not exist"),
        "a directory": ([f"--report={tmp / 'adir'}"], "is a directory"),
        "twice": ([f"--report={tmp / 'r.md'}", f"--report={tmp / 'r.md'}"], "twice"),
        "the output model": ([f"--report={tmp / 'out.json'}"], "is a model path"),
        "unwritable folder": (["--report=/proc/r.json"], "cannot write --report to /proc"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown suffix",
        "missing folder",
        "a directory",
        "twice",
        "the output model",
        "unwritable folder",
    ],
)
def test_a_bad_report_path_exits_2_before_any_work(tmp_path: Path, case: str) -> None:
    model = _save(SMALL_MODEL, tmp_path / "small.onnx")
    good = tmp_path / "good.html"  # a valid report beside the bad one: not written either
    args, message = _bad_report_cases(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / ("out.json" if case == "the output model" else "out.onnx")
    proc = run_cli(model, "-o", out, f"--report={good}", *args)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "--report" in errors[0], proc.stderr
    assert "> load" not in proc.stderr  # refused before the model was even read
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_stderr_on_a_pipe_has_no_colour_codes_and_no_raw_onnxruntime_log(tmp_path: Path):
    model = _save(RESHAPE_MODEL, tmp_path / "reshape.onnx")
    proc = run_cli(model, "-o", tmp_path / "out.onnx")
    assert proc.returncode == 2
    assert not ANSI.search(proc.stderr) and not ORT_LOG.search(proc.stderr), proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("> ")]
    expected = "error: ONNX Runtime cannot run the model on generated inputs"
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    # --debug gives ONNX Runtime's own log back (that is where its lines come from).
    debug = run_cli(model, "-o", tmp_path / "out.onnx", "--debug")
    assert ORT_LOG.search(debug.stderr), debug.stderr


def test_a_successful_run_on_a_pipe_has_no_colour_codes(three_reports) -> None:
    stderr = three_reports["stderr"]
    assert not ANSI.search(stderr)
    folder = str(three_reports["out"].parent)
    # 80 columns, but a path is never broken (the "wrote" and "report" lines)
    assert all(len(line) <= 80 for line in stderr.splitlines() if folder not in line), stderr
    passes = [line for line in stderr.splitlines() if line.startswith("  passed ")]
    assert len(passes) == 3 and all(re.search(r" \d+ ms$", line) for line in passes), stderr


def test_the_live_progress_line_shows_only_when_asked_on_a_pipe(tmp_path: Path) -> None:
    model = _save(SMALL_MODEL, tmp_path / "small.onnx")
    asked = run_cli(model, "-o", tmp_path / "a.onnx", "--progress")
    assert asked.returncode == 0 and ANSI.search(asked.stderr)
    assert re.search(r"0:00:\d\d", asked.stderr)  # the elapsed-time column of the live line
    quiet = run_cli(model, "-o", tmp_path / "b.onnx", "--progress", "-q")
    assert quiet.returncode == 0 and not ANSI.search(quiet.stderr)  # -q wins
    assert "> load" not in quiet.stderr


def test_a_warning_logged_and_reported_is_printed_once_on_one_line(tmp_path: Path) -> None:
    # fp16 on CPU: the quantize stage logs its warning and puts it in the report's notes.
    model = tmp_path / "mlp.onnx"
    onnx.save(float_mlp(), model)
    proc = run_cli(model, "-o", tmp_path / "out.onnx", "--precision", "fp16", "-q")
    assert proc.returncode == 0, proc.stderr
    fp16 = [line for line in proc.stderr.splitlines() if "fp16 on CPU is usually SLOWER" in line]
    assert len(fp16) == 1 and fp16[0].startswith("warning: fp16 on CPU"), proc.stderr
    assert fp16[0].endswith("fp16 pays off on GPUs")  # the whole warning on its line
    assert "pipeline.quantization" not in proc.stderr  # no logger-formatted duplicate


def _help(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "80"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_fits_80_columns_with_whole_option_names() -> None:
    import typer

    from pipeline.cli import app

    text = _help("optimize.py")
    assert max(len(line) for line in text.splitlines()) <= 80
    names = [
        name for param in typer.main.get_command(app).params for name in param.opts if "--" in name
    ]
    assert len(names) > 40
    missing = [name for name in names if not re.search(rf"{re.escape(name)}\b", text)]
    assert not missing, missing
    assert "optimize.py bench" in text
    assert "gpu" in text and "trt" in text  # the provider spellings accepted
    bench = _help("optimize.py", "bench")
    assert max(len(line) for line in bench.splitlines()) <= 80
    assert "--intra-op-threads" in bench and "--batch-sizes" in bench


def test_script_help_lists_the_zoo_and_explains_every_option() -> None:
    from models.zoo import ZOO

    batch = _help("scripts/batch_export.py")
    assert all(name in batch for name in ZOO), batch
    ci = _help("scripts/ci_optimize.py")
    assert all(name in ci for name in ZOO), ci
    for text in (batch, ci):
        # argparse puts an option's help after it, or on the next line when the option is
        # long; an option without help has neither
        lines = text.splitlines()
        alone = [i for i, line in enumerate(lines) if re.match(r"^  -[-\w]+( \S+)?$", line)]
        assert alone  # --executor {local,ray}, --inject-broken-pass NAME, ...
        for index in alone:
            assert lines[index + 1].startswith(" " * 20), f"no help for {lines[index].strip()}"


def test_list_passes_marks_the_default_recipe_and_keeps_whole_sentences() -> None:
    proc = run_cli("--list-passes")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    numbered = [m.group(2) for m in map(re.compile(r"^\s*(\d+) (\w+)").match, lines) if m]
    assert tuple(numbered) == load_recipe("default").passes
    text = " ".join(" ".join(lines).split())
    assert "also x * HardSigmoid(x) into HardSwish." in text  # was cut after "into"
    assert "fuse_embed_layer_norm" in text.split("Other passes")[1]
