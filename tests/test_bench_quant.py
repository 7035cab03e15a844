"""Smoke tests of pipeline/bench/quant.py's pure functions (no model is loaded or exported)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.bench import quant as bench

ROOT = Path(__file__).resolve().parents[1]


def test_nn_margins_are_zero_for_exact_ties():
    e = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])  # rows 1 and 2 tie for row 0
    margins = bench.nn_margins(e)
    assert margins[0] == pytest.approx(0.0, abs=1e-12)
    assert margins[1] > 0.0


def test_mask_iou_and_top1():
    a = np.array([True, True, False, False])
    b = np.array([True, False, True, False])
    assert bench.mask_iou(a, b) == pytest.approx(1 / 3)
    assert bench.mask_iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    logits = np.array([[[0.1, 0.9], [0.8, 0.2]]])
    assert bench.top1_agreement(logits, logits[..., ::-1]) == 0.0
    assert bench.top1_agreement(logits, logits * 2) == 1.0


def test_replace_between_markers_keeps_the_rest_of_the_document():
    text = f"# Benchmarks\n\nintro\n{bench.BEGIN}\nold\n{bench.END}\n\ntail\n"
    updated = bench.replace_between_markers(text, "new", "Quantization")
    assert "old" not in updated and "new" in updated
    assert updated.startswith("# Benchmarks\n\nintro\n") and updated.endswith("\n\ntail\n")
    appended = bench.replace_between_markers("# Benchmarks\n", "table", "Quantization")
    assert appended == f"# Benchmarks\n\n## Quantization\n\n{bench.BEGIN}\ntable\n{bench.END}\n"


def test_sentences_file_is_large_and_varied():
    lines = [line for line in bench.SENTENCES.read_text().splitlines() if line.strip()]
    assert len(lines) >= 300
    assert len(set(lines)) == len(lines)
    lengths = [len(line.split()) for line in lines]
    assert min(lengths) <= 3 and max(lengths) >= 15
    assert len(lines) > bench.EVAL_SIZE  # a calibration split remains


def test_rendered_text_images_are_deterministic_and_inked():
    from models import quant_cnn

    images = quant_cnn.render_text_images(2, 64, 96, seed=3)
    assert images.shape == (2, 64, 96, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, quant_cnn.render_text_images(2, 64, 96, seed=3))
    assert (images.min(axis=-1) < 110).mean() > 0.01  # some glyph ink on the light background
    x = quant_cnn.preprocess(images)
    assert x.shape == (2, 3, 64, 96) and x.dtype == np.float32
    np.testing.assert_allclose(
        x[0, :, 0, 0], (images[0, 0, 0] / 255.0 - quant_cnn.MEAN) / quant_cnn.STD, rtol=1e-5
    )


def test_det_model_path_honours_the_override(tmp_path, monkeypatch):
    from models import quant_cnn

    target = tmp_path / "det.onnx"
    monkeypatch.setenv(quant_cnn.ENV_VAR, str(target))
    assert quant_cnn.det_model_path() == target
