"""The CI optimization job (pipeline/ci_gate.py, run by scripts/ci_optimize.py) gates what it
must and only that.

Runs in-process on small models/kinds.py models (no torch export): a baseline recorded by the
same code passes; an injected parity-breaking pass, a weaker recipe and a worse figure fail
with a readable reason; a model missing from the baseline only warns.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipeline import ci_gate as ci

ROOT = Path(__file__).resolve().parents[1]
MODELS = "float_mlp,paddle_ocr,output_32_1_8210"


def _run(tmp: Path, baseline: Path, *extra: str, models: str = MODELS) -> int:
    return ci.main(["--kinds", models, "--baseline", str(baseline), "--out", str(tmp), *extra])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("baseline")
    path = folder / "baseline.json"
    code = _run(folder / "out", path, "--update-baseline", "--summary", str(folder / "s.md"))
    assert code == 0
    return path


def test_update_baseline_writes_a_valid_file(baseline: Path) -> None:
    data = json.loads(baseline.read_text())
    assert data["schema_version"] == "1.0"
    assert data["recipes"] == ["default"]
    assert set(data["models"]) == {f"{m}/default" for m in MODELS.split(",")}
    for entry in data["models"].values():
        assert entry["status"] == "ok"
        assert entry["rolled_back"] == []
        assert isinstance(entry["nodes_after"], int)
        assert entry["max_abs_error"] is not None and entry["min_cosine"] is not None
        # ratios only, never absolute times
        assert not any("ms" in key or "seconds" in key for key in entry)
    assert data["models"]["paddle_ocr/default"]["nodes_after"] < 16  # the recipe did work


def test_same_code_passes_and_writes_summary(baseline, tmp_path, monkeypatch, capsys) -> None:
    step = tmp_path / "step.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    summary = tmp_path / "summary.md"
    assert _run(tmp_path / "out", baseline, "--summary", str(summary)) == 0
    text = summary.read_text()
    assert "| model | recipe | status | nodes before -> after | parity |" in text
    assert "| paddle_ocr | default | ok | 16 -> " in text
    assert "### Regressions (0)" in text
    # each result's own report, as --report r.md writes it, folded under the table
    assert "<details><summary>paddle_ocr / default: ok</summary>" in text
    assert "#### ✅ `paddle_ocr.onnx`: optimized and verified" in text
    assert step.read_text() == text
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["verdict"] for r in results["results"]} <= {"pass", "improved"}
    assert all(Path(r["report"]).is_file() for r in results["results"])
    assert "0 regression(s)" in capsys.readouterr().out


def test_injected_broken_pass_fails(baseline, tmp_path, capsys) -> None:
    summary = tmp_path / "s.md"
    code = _run(
        tmp_path / "out", baseline, "--inject-broken-pass", "evil", "--summary", str(summary)
    )
    assert code == 1
    err = capsys.readouterr().err
    assert (
        "REGRESSION float_mlp/default: pass(es) rolled back that the baseline did not roll "
        "back: ['evil']" in err
    )
    assert "❌ FAIL" in summary.read_text()
    assert "evil" not in ci.REGISTRY  # registered for the run only


def test_worse_recipe_fails(baseline, tmp_path, capsys) -> None:
    assert _run(tmp_path / "out", baseline, "--recipes", "minimal") == 1
    err = capsys.readouterr().err
    assert "REGRESSION paddle_ocr/minimal: nodes_after 16 > baseline" in err
    assert "(baseline paddle_ocr/default)" in err


def test_new_model_only_warns(baseline, tmp_path, capsys) -> None:
    code = _run(tmp_path / "out", baseline, models="float_mlp,float_cnn")
    assert code == 0
    out = capsys.readouterr().out
    assert "not in the baseline (new, not gated): float_cnn/default" in out


def test_worse_figures_in_a_doctored_baseline_fail(baseline, tmp_path, capsys) -> None:
    data = json.loads(baseline.read_text())
    doctored = copy.deepcopy(data)
    entry = doctored["models"]["paddle_ocr/default"]
    entry["nodes_after"] -= 1
    entry["rolled_back"] = ["collapse_chains"]  # the baseline rolled it back: now an improvement
    path = tmp_path / "doctored.json"
    path.write_text(json.dumps(doctored))
    assert _run(tmp_path / "out", path, models="paddle_ocr") == 1
    captured = capsys.readouterr()
    assert "nodes_after" in captured.err and "> baseline" in captured.err


def test_compare_row_rules() -> None:
    base = {
        "models": {
            "m/default": {
                "status": "ok",
                "nodes_after": 10,
                "max_abs_error": 1e-7,
                "min_cosine": 1.0,
                "latency_ratio": 0.9,
                "latency_noise": 0.02,
                "rolled_back": [],
            }
        }
    }
    row = {
        "model": "m",
        "recipe": "default",
        "status": "ok",
        "message": "",
        "parity_passed": True,
        "max_abs_error": 9e-7,  # under the 1e-6 floor
        "min_cosine": 0.99995,  # within 1e-4
        "nodes_after": 10,
        "rolled_back": [],
        "latency_ratio": 0.99,  # within max(3 * noise, 0.10)
        "latency_noise": 0.02,
    }
    assert ci.compare_row(row, base).verdict == "pass"
    slow = ci.compare_row({**row, "latency_ratio": 1.05}, base)
    assert slow.verdict == "regression" and "latency ratio 1.050" in slow.regressions[0]
    noisy = ci.compare_row({**row, "latency_ratio": 1.05, "latency_noise": 0.1}, base)
    assert noisy.verdict == "pass"  # inside the measured noise: not a regression
    assert ci.compare_row({**row, "max_abs_error": 2e-6}, base).verdict == "regression"
    assert ci.compare_row({**row, "min_cosine": 0.9998}, base).verdict == "regression"
    failed = ci.compare_row({**row, "status": "verification_failed", "message": "x"}, base)
    assert failed.regressions[0].startswith("status verification_failed")
    known_base = {"models": {"m/default": {**base["models"]["m/default"], "status": "error"}}}
    known = ci.compare_row({**row, "status": "error", "nodes_after": None}, known_base)
    assert known.verdict == "known_failure" and known.regressions == []
    fixed = ci.compare_row(row, known_base)
    assert fixed.verdict == "improved" and "status error -> ok" in fixed.improvements
    better = ci.compare_row({**row, "nodes_after": 8}, base)
    assert better.verdict == "improved" and better.regressions == []
    assert ci.compare_row({**row, "model": "other"}, base).verdict == "new"


def test_bad_usage_exits_2(tmp_path, capsys) -> None:
    assert _run(tmp_path / "out", tmp_path / "missing.json") == 2
    assert "baseline not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        ci.main(["--models", "a", "--kinds", "b"])
    assert exc.value.code == 2
    assert _run(tmp_path / "out", tmp_path / "b.json", "--update-baseline", models="nope") == 2
    assert _run(tmp_path / "out", tmp_path / "b.json", "--inject-broken-pass", "remove_dead") == 2
    assert "remove_dead" in ci.REGISTRY  # a real pass is never unregistered


def test_gate_runs_without_kernel_timing_unless_asked() -> None:
    """Node counts are gated, so they must not depend on this CPU's kernel timings."""
    from pipeline.recipe import load_recipe

    default = load_recipe("default")
    assert default.speed.time_kernels
    (gated,) = ci.gate_recipes([default], time_kernels=False)
    assert not gated.speed.time_kernels and gated.passes == default.passes
    assert ci.gate_recipes([default], time_kernels=True)[0].speed.time_kernels
    assert not ci._parse_args([]).time_kernels and ci._parse_args(["--time-kernels"]).time_kernels
