"""pipeline/lm_quality.py: perplexity and top-1 agreement, checked on a bigram "LM" whose
next-token distribution is a table row, so the expected numbers are computed by hand."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest

from pipeline import lm_quality
from pipeline.runtime.errors import UserError
from pipeline.runtime.sessions import create_session

VOCAB = 7


def bigram_lm(table: np.ndarray, with_past: bool = True) -> ir.Model:
    """logits[b, s] = table[input_ids[b, s]]; a past input shaped like a decoder's (unused
    but for a Shape, so the model must accept the empty past the scorer feeds)."""
    past = ', float[batch, 2, past, 4] "past_key_values.0.key"' if with_past else ""
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
g (int64[batch, seq] input_ids, int64[batch, total] attention_mask,
   int64[batch, seq] position_ids{past}) => (float[batch, seq, {VOCAB}] logits) {{
  logits = Gather(table, input_ids)
}}"""
    model = ir.from_onnx_text(text)
    model.graph.initializers["table"] = ir.Value(
        name="table", const_value=ir.tensor(table.astype(np.float32), name="table")
    )
    model.graph.initializers["table"].type = ir.TensorType(ir.DataType.FLOAT)
    model.graph.initializers["table"].shape = ir.Shape(table.shape)
    return model


def _table(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((VOCAB, VOCAB)) * 2


def _sample(table: np.ndarray, n: int) -> np.ndarray:
    """n tokens drawn from the bigram model itself."""
    rng = np.random.default_rng(1)
    probs = np.exp(table) / np.exp(table).sum(axis=1, keepdims=True)
    ids = [0]
    for _ in range(n - 1):
        ids.append(int(rng.choice(VOCAB, p=probs[ids[-1]])))
    return np.array(ids)


def _expected_perplexity(table: np.ndarray, windows: list[np.ndarray]) -> float:
    nll, n = 0.0, 0
    for w in windows:
        for a, b in zip(w[:-1], w[1:], strict=True):
            row = table[a].astype(np.float64)
            nll -= row[b] - math.log(np.exp(row).sum())
            n += 1
    return math.exp(nll / n)


def test_perplexity_and_agreement_match_a_hand_computation():
    reference_table = _table(0)
    candidate_table = reference_table.copy()
    candidate_table[3] = -candidate_table[3]  # token 3 now predicts its least likely follower
    ids = _sample(reference_table, 200)  # text the reference model predicts well
    windows = lm_quality.token_windows(ids, length=16, count=5)
    reference = lm_quality.score(create_session(bigram_lm(reference_table)), windows)
    candidate = lm_quality.score(create_session(bigram_lm(candidate_table)), windows)

    assert reference.tokens == 5 * 15
    assert reference.perplexity == pytest.approx(
        _expected_perplexity(reference_table, windows), rel=1e-5
    )
    quality = lm_quality.compare(reference, candidate)
    positions = np.concatenate([w[:-1] for w in windows])
    assert quality.top1_agreement == pytest.approx(float(np.mean(positions != 3)))
    assert quality.perplexity_ratio > 1
    assert lm_quality.compare(reference, reference).top1_agreement == 1.0


def test_windows_spread_over_the_text_and_never_overlap():
    ids = np.arange(1000)
    windows = lm_quality.token_windows(ids, length=100, count=4)
    assert [int(w[0]) for w in windows] == [0, 300, 600, 900]
    with pytest.raises(UserError, match="fewer than one window"):
        lm_quality.token_windows(ids[:50], length=100, count=4)


def test_a_model_without_decoder_extras_is_scored_too():
    table = _table(2)
    windows = lm_quality.token_windows(np.arange(40) % VOCAB, length=8, count=2)
    with_past = lm_quality.score(create_session(bigram_lm(table)), windows)
    plain = lm_quality.score(create_session(bigram_lm(table, with_past=False)), windows)
    assert plain.perplexity == pytest.approx(with_past.perplexity)


def test_bundled_text_splits_share_no_topic():
    calibration = lm_quality.bundled_text("calibration")
    evaluation = lm_quality.bundled_text("evaluation")
    assert len(calibration) > 100_000 and len(evaluation) > 50_000
    paragraphs = [
        {p.strip() for p in text.split("\n\n")} - {""} for text in (calibration, evaluation)
    ]
    assert not paragraphs[0] & paragraphs[1]


def test_the_benchmark_scores_a_model_and_a_candidate(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pipeline.bench import lm

    words = ["a", "b", "c", "d", "e", "f", "<unk>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    table = _table(3)
    for name, t in (("ref.onnx", table), ("cand.onnx", -table)):
        ir.save(bigram_lm(t), tmp_path / name)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[i] for i in _sample(table, 64) % 6))
    argv = [str(tmp_path / "ref.onnx"), str(tmp_path / "cand.onnx"), "--text", str(text)]
    assert lm.main([*argv, "--windows", "3", "--length", "16"]) == 0
    out = capsys.readouterr().out
    assert "reference perplexity" in out and "top-1 agreement" in out
    assert lm.main([str(tmp_path / "missing.onnx")]) == 2
