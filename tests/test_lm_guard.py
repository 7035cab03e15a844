"""The LM quantization guard (pipeline/quantization/lm_guard.py): a causal LM with its
tokenizer is judged on perplexity and top-1 agreement on real text, not on per-logit cosine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.export import export_model
from pipeline import lm_quality
from pipeline.quantization.lm_guard import LmAccuracy, LmBudget
from tests.test_cli import run_cli

pytestmark = pytest.mark.slow


def byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level tokenizer (ids fit the tiny model's vocabulary of 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm")
    path = folder / "model.onnx"
    export_model("smollm2", path, tiny=True)
    # Named as the zoo's export names it (tokenizer_beside's first choice), so the guard must
    # read this file itself, not a "tokenizer.json" in the folder.
    byte_tokenizer(folder / "model.tokenizer.json")
    return path


def quality(ratio: float, top1: float) -> LmAccuracy:
    scores = lm_quality.LmQuality(10.0, 10.0 * ratio, top1, 2000)
    return LmAccuracy(scores, LmBudget(0.05, 0.90), "calibration")


def test_the_budget_holds_both_figures():
    assert quality(1.04, 0.95).within()
    assert not quality(1.06, 0.99).within()  # perplexity over +5%
    assert not quality(0.99, 0.89).within()  # too many other next tokens
    assert "outside the LM budget" in quality(1.06, 0.99).summary()


def test_bad_budgets_are_usage_errors(tiny_lm, tmp_path):
    done = run_cli(tiny_lm, "-o", tmp_path / "o.onnx", "--precision", "int4", "--min-top1", "2")
    assert done.returncode == 2 and "min top-1 agreement" in done.stderr + done.stdout


def test_int4_of_a_causal_lm_is_judged_on_text(tiny_lm, tmp_path):
    report = tmp_path / "r.json"
    done = run_cli(
        tiny_lm,
        "-o",
        tmp_path / "q.onnx",
        "--report",
        report,
        "--no-speed-check",
        "--precision",
        "int4",
        "--int4-algorithm",
        "affine",
        "--max-perplexity-increase",
        "9",
        "--min-top1",
        "0",
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    section = json.loads(report.read_text())["quantization"]
    assert any("LM guard" in note for note in section["notes"])
    check = section["final_check"]
    assert check["passed"] and "held-out text" in check["against"]
    assert check["outputs"]["split"] == "evaluation" and check["outputs"]["tokens"] > 1000
    assert set(section["accuracy"]) == {"perplexity_ratio", "top1_agreement"}


def test_a_strict_lm_budget_fails_the_run(tiny_lm, tmp_path):
    done = run_cli(
        tiny_lm,
        "-o",
        tmp_path / "q.onnx",
        "--no-speed-check",
        "--precision",
        "int4",
        "--int4-algorithm",
        "rtn",
        "--max-perplexity-increase",
        "0",
        "--min-top1",
        "1",
        timeout=600,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "outside the LM budget" in done.stdout + done.stderr


def test_the_users_text_is_split_into_decision_and_held_out_lines(tiny_lm, tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    lines = [line for line in lm_quality.bundled_text("evaluation").splitlines() if line.strip()]
    (text / "prose.txt").write_text("\n".join(lines[:600]))
    report = tmp_path / "r.json"
    done = run_cli(
        tiny_lm,
        "-o",
        tmp_path / "q.onnx",
        "--report",
        report,
        "--no-speed-check",
        "--precision",
        "int4",
        "--metric",
        "perplexity",
        "--calibration",
        text,
        "--max-perplexity-increase",
        "9",
        "--min-top1",
        "0",
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    section = json.loads(report.read_text())["quantization"]
    assert section["metric"] == "perplexity"
    assert "line(s) of text" in section["data"]["calibration"]
    assert "held-out line(s)" in section["data"]["evaluation"]
    assert "the user's evaluation split" in section["final_check"]["against"]
    assert any("the user's calibration text" in note for note in section["notes"])
