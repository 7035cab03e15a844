"""Golden text of what a person reads after a run: the console summary (from the CLI, as a
subprocess on a pipe at 80 columns) and the same report rendered with a speed measurement
put in by hand, for the console and for Markdown.

Timing is the one thing that differs between runs, so the CLI run is made with
``--no-speed-check`` and the speed wording is checked on a fixed latency section. To accept
an intended change of the text, run ``OVO_UPDATE_GOLDEN=1 pytest tests/test_console_golden.py``
and review the diff of tests/golden/.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import onnx
import pytest
from rich.console import Console

from pipeline.render import console as render_console
from pipeline.render import markdown
from pipeline.summary import summarize
from tests.test_cli import SMALL_MODEL, run_cli

GOLDEN = Path(__file__).parent / "golden"

# The speed section of a run where the optimized model took 0.55x the time: medians and
# the per-round ratio deliberately not derivable from each other (they are medians of
# different numbers), both labelled.
LATENCY = {
    "rounds": 15,
    "runs_per_sample": 1000,
    "median_ms_original": 11.489,
    "median_ms_optimized": 6.402,
    "ratio": 0.553,
    "noise": 0.041,
    "verdict": "faster",
    "session_seconds_original": 0.01,
    "session_seconds_optimized": 0.01,
    "input_shapes": {"x": [2, 4]},
    "intra_op_threads": None,
    "usable_cores": 8,
    "samples_ms_original": [11.489] * 15,
    "samples_ms_optimized": [6.402] * 15,
}
VERSIONS = {"project": "0.1.0", "onnxruntime": "X", "onnx": "X"}


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("OVO_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} changed; see the module docstring"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    folder = tmp_path_factory.mktemp("golden")
    model = folder / "small.onnx"
    onnx.save(onnx.parser.parse_model(SMALL_MODEL), model)
    report = folder / "r.json"
    proc = run_cli(
        model,
        "-o",
        folder / "small.opt.onnx",
        "-q",
        "--no-speed-check",
        "--report",
        report,
        env={"COLUMNS": "80"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr, json.loads(report.read_text()), folder


def _plain(text: str, folder: Path) -> str:
    text = text.replace(str(folder), "TMP")
    return re.sub(r"\(\d+\.\d s\)", "(T s)", text)


def test_console_summary_of_a_small_model(small_run) -> None:
    stderr, _, folder = small_run
    _check("console_small.txt", _plain(stderr, folder))


def _with_speed(data: dict, folder: Path) -> dict:
    data = json.loads(_plain(json.dumps(data), folder))
    data["latency"], data["versions"] = LATENCY, VERSIONS
    for record in data["passes"]:
        record["seconds"] = 0.001
    data["summary"] = summarize(data)
    return data


def test_console_summary_says_faster_with_what_it_was_measured_at(small_run) -> None:
    _, data, folder = small_run
    out = io.StringIO()
    Console(file=out, width=80).print(render_console.summary(_with_speed(data, folder)))
    text = out.getvalue()
    _check("console_speed.txt", text)
    assert "1.81x faster" in text  # 1 / 0.553
    assert "median per run: 11.49 ms -> 6.40 ms" in text
    assert "per-round ratio 0.55 ±0.04 (optimized/original, 15 rounds)" in text
    assert "measured at x[2,4]; ORT default threads (8 cores)" in text


def test_markdown_report_of_a_small_model(small_run) -> None:
    _, data, folder = small_run
    _check("report_small.md", markdown.render(_with_speed(data, folder)))
