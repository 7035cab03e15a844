"""models/minilm.py: the tokenizer helper and the exporters' failure modes (fast).

The exports themselves are checked (against PyTorch, and through the CLI) by the slow MiniLM
cases in test_model_kinds.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models import minilm


def test_example_inputs_are_real_padded_int64_tokens() -> None:
    feeds = minilm.example_inputs(["a short one", "a somewhat longer sentence than that"])
    assert list(feeds) == list(minilm.INPUT_NAMES)
    assert all(a.dtype == np.int64 and a.shape == feeds["input_ids"].shape for a in feeds.values())
    assert feeds["input_ids"].shape[0] == 2
    assert feeds["input_ids"][0, 0] == 101  # [CLS] from the bundled vocabulary
    assert feeds["attention_mask"][0, -1] == 0 and feeds["attention_mask"][1, -1] == 1
    assert (feeds["input_ids"][feeds["attention_mask"] == 0] == 0).all()  # [PAD]


def test_unknown_exporter_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="unknown exporter"):
        minilm.export_minilm(target, exporter="nope")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_optimum_exporter_works_or_says_what_is_missing(tmp_path: Path) -> None:
    # Optimum 2.x moved its ONNX exporter into the optimum-onnx package.
    target = tmp_path / "m.onnx"
    try:
        import optimum.exporters.onnx  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="optimum-onnx"):
            minilm.export_minilm(target, exporter="optimum")
        assert list(tmp_path.iterdir()) == []
        return
    import onnxruntime as ort

    minilm.export_minilm(target, exporter="optimum")
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    feeds = minilm.example_inputs()
    wanted = {i.name for i in session.get_inputs()}
    (hidden, *_) = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
    assert hidden.shape == (*feeds["input_ids"].shape, 384)
