"""The data a quantization decides and checks on (pipeline/quantization/data.py): the
evaluation split never shares an item with the calibration/decision split, whatever the
order or duplicates, and text becomes the model's own inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

from pipeline.quantization import data
from pipeline.runtime.errors import UserError


def _encoder(inputs=("input_ids", "attention_mask", "token_type_ids")):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["y"])],
        "encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"]) for n in inputs],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "s"])],
    )
    return helper.make_model(graph)


def _tokenizer(path):
    """A word-level tokenizer.json with [PAD]=0, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a cat dog sat ran on mat fast slow red blue one two three".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def _lines(count):
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on mat fast slow red blue one two three".split()
    return [" ".join(rng.choice(words, size=rng.integers(2, 9))) + f" {i}" for i in range(count)]


def test_text_splits_never_overlap_and_do_not_depend_on_order_or_duplicates(tmp_path):
    lines = _lines(200)
    tokenizer = _tokenizer(tmp_path / "tokenizer.json")
    for name, content in (
        ("a", lines),
        ("b", list(reversed(lines)) + lines[:50]),  # reordered, 50 duplicates
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "sentences.txt").write_text("\n".join(content) + "\n\n")
        held = [line for line in content if data.held_out(line.encode())]
        kept = [line for line in content if not data.held_out(line.encode())]
        assert not set(held) & set(kept)
        assert 0.1 < len(set(held)) / len(set(content)) < 0.4  # about 1 in EVALUATION_EVERY
        samples = data.load(_encoder(), None, folder, None, tokenizer, fallback=[])
        assert samples.held_out and not samples.generated
        assert len(samples.evaluation) == -(-len(held) // data.TEXT_BATCH)
        assert len(samples.decision) == -(-len(kept) // data.TEXT_BATCH)
        assert "held out by content hash" in samples.roles["evaluation"]
    assert {line for line in lines if data.held_out(line.encode())} == {
        line for line in reversed(lines) if data.held_out(line.encode())
    }


def test_text_becomes_the_models_inputs_padded_per_batch(tmp_path):
    tokenizer = _tokenizer(tmp_path / "tokenizer.json")
    feeds = data.tokenize(["the cat sat", "a dog ran on the mat fast"], tokenizer, _encoder())
    (batch,) = feeds
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"].shape == (2, 7) and batch["input_ids"].dtype == np.int64
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]
    assert batch["input_ids"][0, 3:].tolist() == [0] * 4  # [PAD]
    assert not batch["token_type_ids"].any()
    with pytest.raises(UserError, match="pixel_values"):
        data.tokenize(["the cat"], tokenizer, _encoder(("input_ids", "pixel_values")))


def test_input_sets_split_by_content_and_an_explicit_evaluation_drops_overlaps(tmp_path):
    calib, held = tmp_path / "calib", tmp_path / "held"
    calib.mkdir()
    held.mkdir()
    sets = [{"input_ids": np.full((1, 4), i, np.int64)} for i in range(12)]
    for i, feed in enumerate(sets):
        np.savez(calib / f"{i:02d}.npz", **feed)
    samples = data.load(_encoder(["input_ids"]), None, calib, None, None, fallback=[])
    decided = {int(f["input_ids"][0, 0]) for f in samples.decision}
    evaluated = {int(f["input_ids"][0, 0]) for f in samples.evaluation}
    assert decided and evaluated and not decided & evaluated
    assert decided | evaluated == set(range(12))
    np.savez(held / "same_as_3.npz", **sets[3])
    np.savez(held / "new.npz", input_ids=np.full((1, 4), 99, np.int64))
    samples = data.load(_encoder(["input_ids"]), None, calib, held, None, fallback=[])
    assert [int(f["input_ids"][0, 0]) for f in samples.evaluation] == [99]
    assert len(samples.decision) == 12 and "dropped" in samples.roles["evaluation"]


def test_without_data_every_role_is_the_verification_sets_and_says_so():
    fallback = [{"input_ids": np.zeros((1, 4), np.int64)}]
    samples = data.load(_encoder(["input_ids"]), None, None, None, None, fallback)
    assert samples.generated and not samples.held_out
    assert samples.decision == fallback and samples.evaluation == fallback
    assert "generated" in json.dumps(samples.roles)


def test_a_causal_lms_text_is_split_by_line_for_the_lm_guard(tmp_path):
    lines = _lines(40)
    (tmp_path / "t.txt").write_text("\n".join(lines))
    samples = data.load(_encoder(), None, tmp_path, None, None, [], causal_lm=True)
    calibration_text, evaluation_text = samples.text
    assert not set(calibration_text.splitlines()) & set(evaluation_text.splitlines())
    assert set(calibration_text.splitlines()) | set(evaluation_text.splitlines()) == set(lines)


def test_text_without_a_tokenizer_is_a_usage_error(tmp_path):
    (tmp_path / "t.txt").write_text("the cat\n")
    with pytest.raises(UserError, match="tokenizer"):
        data.load(_encoder(), None, tmp_path, None, None, [])


def test_a_models_own_tokenizer_file_wins_over_the_folders(tmp_path):
    from pipeline.quantization.lm_guard import tokenizer_beside

    model = tmp_path / "smollm2.onnx"
    model.write_bytes(b"")
    assert tokenizer_beside(model) is None
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tokenizer_beside(model) == tmp_path / "tokenizer.json"
    (tmp_path / "smollm2.tokenizer.json").write_text("{}")
    assert tokenizer_beside(model) == tmp_path / "smollm2.tokenizer.json"
