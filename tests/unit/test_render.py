"""The pieces of what a person reads: speed and size words, report.json's order and
compaction, the SVG plots, the live progress line and the warning log (issue 16)."""

from __future__ import annotations

import json
import logging
import warnings
import xml.etree.ElementTree as ET

import hypothesis.strategies as st
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given
from rich.console import Console

from pipeline.cli import WarningLog
from pipeline.render import html, json_text, svg
from pipeline.render.live import LiveProgress
from pipeline.report import JSON_ORDER, Report, model_facts
from pipeline.runtime import progress
from pipeline.runtime.timing import speed_words
from pipeline.summary import candidate_rows, parity_words, size_text, summarize
from tests.test_cli import SMALL_MODEL

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize(
    ("ratio", "noise", "verdict", "margin", "words"),
    [
        (0.55, 0.04, "faster", 0.0, "1.82x faster"),
        (1.32, 0.05, "slower", 0.0, "1.32x slower"),
        (1.22, 0.36, "same", 0.05, "same (within noise ±36%)"),
        (1.01, 0.031, "same", 0.05, "same (within noise ±3.1%)"),
        # a difference beyond the noise but inside the margin is not called noise
        (0.97, 0.01, "same", 0.05, "same (within the ±5.0% margin; noise ±1.0%)"),
    ],
)
def test_speed_words(ratio, noise, verdict, margin, words) -> None:
    assert speed_words(ratio, noise, verdict, margin) == words


@pytest.mark.parametrize(
    ("size", "text"),
    [(313, "313 B"), (4_200, "4.2 kB"), (90_370_000, "90.4 MB"), (1_200_000_000, "1.20 GB")],
)
def test_sizes_are_decimal(size: int, text: str) -> None:
    assert size_text(size) == text


def test_parity_words_name_the_worst_output_and_the_tolerance() -> None:
    verify = {"rtol": 1e-4, "atol": 1e-5}
    parity = {
        "passed": True,
        "sets": 2,
        "summary": "",
        "outputs": [{"name": "a", "max_abs_error": 1e-7}, {"name": "b", "max_abs_error": 2.7e-6}],
    }
    assert parity_words(parity, verify) == (
        True,
        "same outputs within tolerance on 2 input sets (max abs error 2.7e-06 on 'b'; "
        "rtol 0.0001, atol 1e-05)",
    )
    failed = {**parity, "passed": False, "summary": "'b' differs"}
    assert parity_words(failed, verify) == (False, "DIFFERENT outputs: 'b' differs")
    assert parity_words(None, verify)[0] is None


@pytest.fixture(scope="module")
def report() -> Report:
    model = ir.from_proto(onnx.parser.parse_model(SMALL_MODEL))
    facts = model_facts(model, None)
    rows = [
        {"name": "fold", "modified": True, "verification": "passed", "seconds": 0.1},
        {"name": "fold", "modified": False, "verification": "not_needed", "seconds": 0.2},
        {"name": "dead", "modified": False, "verification": "not_needed", "seconds": 0.3},
        {"name": "bad", "modified": True, "verification": "rolled_back", "seconds": 0.4},
        {"name": "dead", "modified": False, "verification": "not_needed", "seconds": 0.5},
    ]
    passes = [{"iteration": 1, "nodes_before": 9, "nodes_after": 9, "matches": 0} | r for r in rows]
    recipe = {"verify": {"rtol": 1e-4, "atol": 1e-5}, "speed": {"check": True}}
    return Report(recipe=recipe, input_model=facts, output_model=facts, passes=passes)


def test_report_json_opens_with_status_and_collapses_idle_passes(report: Report) -> None:
    data = report.to_dict()
    assert list(data)[: len(JSON_ORDER)] == list(JSON_ORDER)
    assert list(data)[0] == "status"
    assert [(p["name"], p["verification"]) for p in data["passes"]] == [
        ("fold", "passed"),
        ("bad", "rolled_back"),
    ]
    assert data["passes_unchanged"] == [
        {"name": "fold", "runs": 1, "seconds": 0.2},
        {"name": "dead", "runs": 2, "seconds": 0.8},
    ]
    assert data["summary"]["passes_applied"] == 1  # the rolled-back one did not apply


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@given(json_values)
def test_compact_json_holds_the_same_content(value) -> None:
    assert json.loads(json_text.dumps(value)) == value


def test_compact_json_keeps_plain_lists_and_short_objects_on_one_line() -> None:
    text = json_text.dumps({"shape": [1, 2, 3], "row": {"op": "Add", "n": 1}, "deep": [{"a": [1]}]})
    assert '"shape": [1, 2, 3],' in text and '"row": {"op": "Add", "n": 1},' in text
    assert len(text.splitlines()) == 9


@given(st.floats(-1e6, 1e6), st.floats(1e-3, 1e6))
def test_ticks_cover_the_range(low: float, span: float) -> None:
    ticks = svg.nice_ticks(low, low + span)
    assert ticks[0] <= low and ticks[-1] >= low + span
    assert 2 <= len(ticks) <= 12


def test_each_plot_is_well_formed_svg_with_a_title() -> None:
    plots = [
        svg.strip_plot("t1", {"a": [1.0, 2.0], "b": [1.5]}, "ms"),
        svg.paired_bars("t2", [("Add", 3, 1), ("Mul", 0, 2)], ("before", "after")),
        svg.log_bars("t3", [("y", 0.0, False), ("z", 2e-6, True)], "error"),
        svg.scatter("t4", [("fp32", 1.0, 0.0, False), ("int8", 0.6, 0.4, True)], "x", "y", 1.0),
    ]
    for index, text in enumerate(plots, 1):
        root = ET.fromstring(text)
        assert root.find(f"{SVG}title").text == f"t{index}"
    assert "0 (identical)" in plots[2] and svg.COLOURS["bad"] in plots[2]
    assert svg.COLOURS["bad"] in plots[3]  # the chosen point stands out
    # every label of the scatter stays inside the picture
    for text in ET.fromstring(plots[3]).iter(f"{SVG}text"):
        assert 0 <= float(text.get("x")) <= svg.WIDTH


def test_html_report_draws_the_quantization_front(report: Report) -> None:
    data = report.to_dict()
    data["quantization"] = {
        "precision": "int8-dynamic",
        "metric": "cosine",
        "candidates": [
            {"precision": "fp32", "latency_ratio": 1.0, "verdict": "baseline"},
            {
                "precision": "int8-dynamic",
                "latency_ratio": 0.6,
                "noise": 0.05,
                "drop": 0.004,
                "max_drop": 0.01,
                "accuracy": {"out": 0.996},
                "kept_float": 1,
                "chosen": True,
                "verdict": "faster",
            },
        ],
    }
    data["summary"] = summarize(data)
    page = html.render(data)
    assert "Quantization front: speed vs accuracy drop" in page
    assert candidate_rows(data)[1] == (
        "int8-dynamic *",
        "1",
        "out 0.9960",
        "0.004/0.01",
        "0.60x ±0.05",
        "faster",
    )
    assert "int8-dynamic vs fp32" in json.dumps(data["summary"]["checks"])


def test_live_line_shows_the_stage_and_its_nested_loops() -> None:
    live = LiveProgress(Console(file=open("/dev/null", "w"), force_terminal=False))  # noqa: SIM115
    with live:
        live.stage("quantize auto")
        progress.advance("candidate int8-dynamic", 1, 3)
        progress.advance("round", 4, 15)
        task = live._progress.tasks[0]
        assert task.description == "quantize auto · candidate int8-dynamic 1/3 · round 4/15"
        progress.advance("candidate int4", 2, 3)  # the next candidate's rounds start over
        assert task.description == "quantize auto · candidate int4 2/3"
        live.stage("speed check")
        assert live._progress.tasks[-1].description == "speed check"
    progress.advance("round", 1, 2)  # nobody listens any more: nothing happens


def test_warning_log_keeps_one_line_per_warning() -> None:
    log = WarningLog()
    root = logging.getLogger()
    root.addHandler(log)
    logging.captureWarnings(True)
    try:
        logging.getLogger("pipeline.x").warning("first\n  second line")
        logging.getLogger("pipeline.x").info("not a warning")
        warnings.warn("a library says so", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        root.removeHandler(log)
    assert log.lines == ["first second line", "UserWarning: a library says so"]


def test_each_stage_checks_its_own_model_and_the_provider_says_why(report: Report) -> None:
    data = report.to_dict()
    data["status"] = "ok"
    data["parity"] = {"passed": True, "sets": 2, "summary": "", "outputs": []}
    data["quantization"] = {
        "precision": "int8-dynamic",
        "metric": "cosine",
        "final_check": {"passed": True, "summary": "mean cosine 0.9990", "max_drop": 0.01},
    }
    data["provider"] = {
        "requested": ["tensorrt", "cuda", "cpu"],
        "resolved": "cuda",
        "fallback": False,
        "reason": "the first that works here; skipped tensorrt: no libnvinfer",
        "check": {"ran": True, "passed": False, "summary": "'y' differs on cuda"},
    }
    checks = summarize(data)["checks"]
    assert [(c["stage"], c["passed"]) for c in checks] == [
        ("graph passes (fp32)", True),
        ("int8-dynamic vs fp32", True),
        ("on cuda", False),
    ]
    assert checks[1]["words"].startswith("within budget (cosine drop <= 0.01): mean cosine")
    assert summarize(data)["provider"] == (
        "cuda: the first that works here; skipped tensorrt: no libnvinfer"
    )
    data["provider"] = {"requested": ["cpu"], "resolved": "cpu", "fallback": False}
    assert summarize(data)["provider"] == "cpu"
