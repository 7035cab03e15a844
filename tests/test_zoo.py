"""The model zoo: every entry exports (tiny) with its default exporter and matches PyTorch;
a tampered export raises ExportMismatch and leaves nothing behind; a dynamo export works."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from models import export  # noqa: E402
from models.zoo import ZOO  # noqa: E402

SLOW = {"minilm", "vit", "whisper_encoder", "mobilenet"}


def test_list_models_is_the_registry() -> None:
    assert export.list_models() == list(ZOO)
    assert {"minilm", "bert_base", "gpt2", "vit", "whisper_encoder", "resnet", "mobilenet"} <= set(
        ZOO
    )


@pytest.mark.parametrize("name", [n for n in ZOO if n not in SLOW])
def test_tiny_export_validates(name: str, tmp_path: Path) -> None:
    _check_export(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_tiny_export_validates_slow(name: str, tmp_path: Path) -> None:
    _check_export(name, tmp_path)


def _check_export(name: str, tmp_path: Path) -> None:
    target = tmp_path / f"{name}.onnx"
    record = export.export_model(name, target, tiny=True)
    assert record.exporter == ZOO[name].exporters[0]
    assert record.path == target and target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no staging left
    assert record.validation["passed"] and record.validation["sets"] == 2
    for output in record.validation["outputs"].values():
        assert output["max_abs_error"] <= 1e-3 and output["cosine"] > 0.9999
    assert record.nodes and record.nodes > 10


def test_example_inputs_find_bugs() -> None:
    feeds = ZOO["bert_base"].example_inputs(True, 2, 8)
    mask = feeds["attention_mask"]
    assert mask.shape == (2, 8) and mask.dtype == np.int64
    assert mask[0, -1] == 0 and mask[0, 0] == 1  # right padding
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # left padding
    assert (np.diff(mask[1]) != 0).sum() > 1  # ... and a hole
    assert (mask.sum(axis=1) > 0).all()
    assert feeds["input_ids"].max() < 30522 and feeds["input_ids"].min() >= 0
    gpt2 = ZOO["gpt2"].example_inputs(True, 3, 13)
    past = gpt2["past_key_values.0.key"].shape[2]
    assert gpt2["attention_mask"].shape == (3, past + 13)
    assert gpt2["input_ids"].max() < 50257


def test_tampered_export_raises_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    real_run = export.run_onnx

    def perturbed(path, feed_sets):
        results = real_run(path, feed_sets)
        results[1]["logits"] = results[1]["logits"] + 1e-2  # one set, one output
        return results

    monkeypatch.setattr(export, "run_onnx", perturbed)
    target = tmp_path / "resnet.onnx"
    with pytest.raises(export.ExportMismatch, match="'logits'") as info:
        export.export_model("resnet", target, tiny=True)
    assert "max abs error" in str(info.value)
    assert not info.value.comparison.passed
    assert list(tmp_path.iterdir()) == []


def test_tampered_export_keeps_an_earlier_good_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "resnet.onnx"
    export.export_model("resnet", target, tiny=True)
    before = target.read_bytes()
    monkeypatch.setattr(
        export,
        "run_onnx",
        lambda path, sets: [
            {"logits": np.zeros((len(s["pixel_values"]), 10), np.float32)} for s in sets
        ],
    )
    with pytest.raises(export.ExportMismatch):
        export.export_model("resnet", target, tiny=True)
    assert target.read_bytes() == before


def test_dynamo_export_validates(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    target = tmp_path / "resnet.onnx"
    record = export.export_model("resnet", target, exporter="torch-dynamo", tiny=True)
    assert record.exporter == "torch-dynamo" and record.validation["passed"]
    import onnx

    model = onnx.load(str(target))
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2:] == ["height", "width"]


def test_unknown_name_and_exporter(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown zoo model"):
        export.export_model("nope", tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="does not support"):
        export.export_model("resnet", tmp_path / "x.onnx", exporter="optimum")
    assert list(tmp_path.iterdir()) == []
