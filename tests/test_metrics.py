"""The accuracy metrics a quantization budget is held to (pipeline/quantization/metrics.py).

Pure functions on small arrays: each metric must see the change the user cares about and
ignore what the user does not (padding, a scale), and a plug-in must be loaded and policed.
"""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from pipeline.quantization import metrics
from pipeline.runtime.errors import UserError

RNG = np.random.default_rng(0)


def test_mean_pool_ignores_padding_positions():
    hidden = np.array(
        [[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]], [[5.0, 5.0], [7.0, 9.0], [9.0, 13.0]]],
        dtype=np.float32,
    )
    mask = np.array([[1, 1, 0], [1, 1, 1]], dtype=np.int64)
    pooled = metrics.mean_pool(hidden, mask)
    np.testing.assert_allclose(pooled, [[2.0, 3.0], [7.0, 9.0]])


def test_mean_pool_of_an_all_padding_row_is_zero_not_nan():
    pooled = metrics.mean_pool(np.ones((1, 2, 3), np.float32), np.zeros((1, 2), np.int64))
    assert np.all(np.isfinite(pooled)) and np.all(pooled == 0)


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [0.0, 3.0]])
    np.testing.assert_allclose(metrics.cosine_rows(a, b), [1.0, -1.0, 0.0], atol=1e-12)


def test_nearest_neighbours_skips_self():
    e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert metrics.nearest_neighbours(e).tolist() == [1, 0, 3, 2]


def test_nn_agreement_counts_changed_neighbours():
    reference = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 0.1]])
    assert metrics.nn_agreement(reference, reference * 3.0) == 1.0  # scale-free
    moved = reference.copy()
    moved[3] = [0.95, 0.05, 0.0]  # 3 now sits by 0 and 1, far from 2
    assert metrics.nearest_neighbours(reference).tolist() == [1, 0, 3, 2]
    assert metrics.nearest_neighbours(moved).tolist() == [3, 3, 1, 0]
    assert metrics.nn_agreement(reference, moved) == 0.0
    moved = reference.copy()
    moved[2] = [0.0, 0.9, 0.2]  # a small move that keeps every neighbour
    assert metrics.nn_agreement(reference, moved) == 1.0


def _hidden_sets(samples: int = 12, seq: int = 6, dim: int = 16):
    """Feeds with left-to-right masks of varied lengths and [B, S, H] hidden states."""
    feeds, outputs = [], []
    for _ in range(samples // 4):
        lengths = RNG.integers(2, seq + 1, size=4)
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        feeds.append({"input_ids": np.ones((4, seq), np.int64), "attention_mask": mask})
        outputs.append({"last_hidden_state": RNG.standard_normal((4, seq, dim)).astype(np.float32)})
    return feeds, outputs


def test_pooled_cosine_ignores_padding_and_sees_a_change_of_the_mean():
    feeds, reference = _hidden_sets()
    padded = []
    for feed, out in zip(feeds, reference, strict=True):
        noisy = out["last_hidden_state"].copy()
        noisy[feed["attention_mask"] == 0] = 1e6  # padded positions: garbage no user sees
        padded.append({"last_hidden_state": noisy})
    same = metrics.resolve("pooled-cosine").score(reference, padded, feeds)
    assert same.value == pytest.approx(1.0) and same.drop == pytest.approx(0.0, abs=1e-12)
    assert same.details["nn_agreement"] == 1.0 and same.details["samples"] == 12
    # per-token cosine sees the same per-token noise that pooling averages out
    shifted = [
        {"last_hidden_state": o["last_hidden_state"] + RNG.standard_normal((4, 6, 16)) * 0.5}
        for o in reference
    ]
    pooled = metrics.resolve("pooled-cosine").score(reference, shifted, feeds)
    per_token = metrics.resolve("cosine").score(reference, shifted, feeds)
    assert 0 < pooled.drop < per_token.drop
    assert pooled.within(pooled.drop) and not pooled.within(pooled.drop / 2)
    assert "mean pooled cosine" in pooled.summary(0.001)


def test_pooled_cosine_takes_a_pooled_output_as_it_is_and_refuses_a_model_without_one():
    feeds = [{"x": np.zeros((3, 4), np.float32)}]
    reference = [{"embedding": np.eye(3, 8, dtype=np.float32)}]
    flipped = [{"embedding": -np.eye(3, 8, dtype=np.float32)}]
    score = metrics.resolve("pooled-cosine").score(reference, flipped, feeds)
    assert score.value == pytest.approx(-1.0) and not score.within(0.5)
    with pytest.raises(UserError, match="pooled-cosine"):
        metrics.resolve("pooled-cosine").score([{"y": np.zeros(3, np.float32)}], [{}], feeds)


def test_top1_counts_argmax_agreement_on_unmasked_positions_only():
    logits = np.zeros((1, 4, 5), np.float32)
    logits[0, np.arange(4), [0, 1, 2, 3]] = 1.0
    changed = logits.copy()
    changed[0, 1] = 0.0
    changed[0, 1, 4] = 1.0  # position 1 now picks token 4
    changed[0, 3] = 0.0
    changed[0, 3, 4] = 1.0  # position 3 too, but it is padding
    feeds = [{"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.array([[1, 1, 1, 0]])}]
    score = metrics.resolve("top1").score([{"logits": logits}], [{"logits": changed}], feeds)
    assert score.value == pytest.approx(2 / 3) and score.details["positions"] == 3


def test_cosine_metric_fails_on_a_changed_integer_output_whatever_the_budget():
    y = RNG.standard_normal((2, 8)).astype(np.float32)
    reference = [{"y": y, "ids": np.array([1, 2])}]
    candidate = [{"y": y, "ids": np.array([1, 3])}]
    score = metrics.resolve("cosine").score(reference, candidate, [{}])
    assert score.value == pytest.approx(1.0) and not score.within(0.99)
    assert "ids" in score.summary(0.99)


def test_a_plugin_metric_from_a_module_or_a_file_returns_a_loss(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """
        import numpy as np

        def max_error(reference, candidate, feeds):
            assert len(reference) == len(candidate) == len(feeds)
            return max(float(np.abs(r["y"] - c["y"]).max()) for r, c in zip(reference, candidate))

        def negative(reference, candidate, feeds):
            return -1.0

        def broken(reference, candidate, feeds):
            raise KeyError("y_missing")
        """
    )
    (tmp_path / "my_scores.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_scores", None)
    reference = [{"y": np.zeros(4, np.float32)}]
    candidate = [{"y": np.array([0, 0.25, 0, 0], np.float32)}]
    for spec in ("my_scores:max_error", f"{tmp_path / 'my_scores.py'}:max_error"):
        score = metrics.resolve(spec).score(reference, candidate, [{}])
        assert score.value == pytest.approx(0.25) and score.drop == pytest.approx(0.25)
        assert score.within(0.25) and not score.within(0.2)
        assert "loss 0.25 > 0.2" in score.summary(0.2)
    with pytest.raises(UserError, match="must be finite and >= 0"):
        metrics.resolve("my_scores:negative").score(reference, candidate, [{}])
    with pytest.raises(UserError, match="raised"):
        metrics.resolve("my_scores:broken").score(reference, candidate, [{}])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nonsense", "MODULE:FUNCTION"),
        ("no_such_module_xyz:f", "cannot import"),
        ("numpy:no_such_function", "no function"),
        ("/nowhere/x.py:f", "file not found"),
    ],
)
def test_a_bad_metric_name_is_a_usage_error(spec, message):
    with pytest.raises(UserError, match=message):
        metrics.resolve(spec)


def test_pooled_cosine_also_holds_nearest_neighbour_agreement_to_its_floor():
    pairs = RNG.standard_normal((12, 16))
    reference = np.repeat(pairs, 2, axis=0) + RNG.standard_normal((24, 16)) * 0.05  # 12 pairs
    moved = reference.copy()
    moved[0], moved[2] = reference[2], reference[0]  # two samples trade places: 4 flips
    feeds = [{"x": np.zeros((24, 1), np.float32)}]
    ref_out, cand_out = [{"e": reference}], [{"e": moved}]
    score = metrics.resolve("pooled-cosine").score(ref_out, cand_out, feeds)
    assert score.values["nn_agreement"] < 0.95 and score.value > 0.5
    assert not score.within(1.0)  # no cosine budget excuses the flips
    assert "nearest-neighbour agreement" in score.summary(1.0)
    relaxed = metrics.resolve("pooled-cosine", min_neighbour_agreement=0.5)
    assert relaxed.score(ref_out, cand_out, feeds).within(1.0)
    few = metrics.resolve("pooled-cosine").score(
        [{"e": reference[:8]}], [{"e": moved[:8]}], [{"x": np.zeros((8, 1))}]
    )
    assert few.failure is None  # 8 samples cannot tell a flip from noise
