"""pipeline/bench/generate.py on the zoo's tiny SmolLM2 export: greedy decoding with the KV
cache gives the tokens of a full-sequence run, and the benchmark compares two models."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from models.export import export_model
from pipeline.bench import generate as gen
from pipeline.runtime.sessions import create_session

pytestmark = pytest.mark.slow  # exports the tiny model (~17 s)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "smollm2.onnx"
    export_model("smollm2", path, tiny=True)
    return path


def test_cached_greedy_decoding_matches_full_sequence_runs(tiny_llm):
    session = create_session(ir.load(tiny_llm))
    prompt = gen.prompt_ids(session, batch=2, length=5)
    generation = gen.generate(session, prompt, new_tokens=4)
    assert generation.ids.shape == (2, 4) and generation.decode_steps == 3
    # the same tokens without the cache: the whole sequence each time, past length 0
    ids = prompt
    for step in range(4):
        batch, length = ids.shape
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, length), dtype=np.int64),
            "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1)),
        }
        for name, shape in gen._past_inputs(session).items():
            feeds[name] = np.zeros((batch, *shape[1:]), dtype=np.float32)
        nxt = np.asarray(session.run(feeds)["logits"])[:, -1].argmax(axis=-1)
        assert np.array_equal(nxt, generation.ids[:, step])
        ids = np.concatenate([ids, nxt[:, None]], axis=1)


def test_benchmark_compares_two_models(tiny_llm, tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = [str(tiny_llm), str(tiny_llm), "--threads", "1", "--batches", "1"]
    argv += ["--prompt", "4", "--new-tokens", "3", "--rounds", "3", "--json", str(out)]
    assert gen.main(argv) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["parity"]["same_interface"] is True
    assert set(result["parity"]["max_abs_diff"]) == {
        "b1_prefill",
        "b1_decode",
        "b1_past_6_plus_2",
        "b2_left_padded_prefill",
        "b2_left_padded_decode",
        "b2_left_padded_past_6_plus_2",
    }
    diffs = result["parity"]["max_abs_diff"].values()
    assert all(d == {"logits": 0.0, "present": 0.0} for d in diffs)
    assert row["same_tokens"] is True
    assert row["original"]["peak_rss_bytes"] > 10 * 2**20
    assert row["candidate"]["decode_tokens_per_s"] > 0
    assert "same tokens: True" in capsys.readouterr().out


def test_a_model_without_past_is_refused(tmp_path, capsys):
    model = tmp_path / "plain.onnx"
    ir.save(
        ir.from_onnx_text(
            """<ir_version: 10, opset_import: ["" : 17]>
g (int64[1, 2] input_ids) => (int64[1, 2] logits) { logits = Identity(input_ids) }"""
        ),
        model,
    )
    assert gen.main([str(model), str(model), "--rounds", "3"]) == 2
    assert "no past_key_values" in capsys.readouterr().err


def test_pytorch_row_decodes_the_exports_tokens(tiny_llm, tmp_path, capsys):
    """pipeline/bench/generate_torch.py: the tiny SmolLM2 in PyTorch (the weights the tiny
    export was made from) decodes the export's greedy tokens, and its row has the columns."""
    from pipeline.bench import generate_torch

    session = create_session(ir.load(tiny_llm))
    prompt = gen.prompt_ids(session, batch=2, length=5)
    want = gen.generate(session, prompt, new_tokens=4)
    got = generate_torch.generate_torch(generate_torch.load_model(tiny=True), prompt, 4)
    assert np.array_equal(got.ids, want.ids) and got.decode_steps == 3
    out = tmp_path / "torch.json"
    argv = [str(tiny_llm), "--tiny", "--threads", "1", "--batches", "1"]
    argv += ["--prompt", "4", "--new-tokens", "3", "--rounds", "3", "--json", str(out)]
    assert generate_torch.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["same_tokens"] is True
    assert row["pytorch"]["peak_rss_bytes"] > row["export"]["peak_rss_bytes"] > 10 * 2**20
    assert row["pytorch"]["decode_tokens_per_s"] > 0 and row["pytorch"]["ttft_ms"] > 0
    assert "PyTorch" in capsys.readouterr().out
