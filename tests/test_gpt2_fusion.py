"""End to end: the zoo's tiny GPT-2 (optimum export, with past key/values) after the default
clean-up passes gets attention fused in every layer, keeps its signature (``present.N.*``
outputs with their shapes) and matches the original at ORT_DISABLE_ALL on past lengths 0 and
> 0, a one-token decode step, batch >= 2, and masks with left padding (query rows that see
nothing at all), holes and right padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graph_passes.fusions.decoder_attention import FuseDecoderAttention
from graph_passes.registry import REGISTRY
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, assert_parity

pytestmark = pytest.mark.slow  # exports a model (~20 s) and runs it at several shapes

LAYERS, HEADS, HEAD_DIM, VOCAB = 2, 2, 32, 50257  # models.gpt2 tiny
TOL = {"rtol": 1e-4, "atol": 1e-5}
CLEAN_UP = (  # the default recipe's passes that run before the fusions
    "fold_shapes",
    "fold_constants",
    "lift_constants",
    "remove_noops",
    "collapse_chains",
    "fuse_layer_norm",
    "eliminate_common_subexpressions",
    "merge_duplicate_initializers",
    "remove_dead",
)


def decoder_feeds(batch: int, seq: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of one generation step; mask rows cycle left padding over the whole past and
    the first new token, holes, right padding, none. ``position_ids`` as generate() makes
    them (attended positions counted, padding at 1)."""
    rng = np.random.default_rng(seed)
    total = past + seq
    mask = np.ones((batch, total), dtype=np.int64)
    for row in range(batch):
        kind = row % 4
        if kind == 0:
            mask[row, : past + 1] = 0
        elif kind == 1:
            mask[row, 1::3] = 0
        elif kind == 2:
            mask[row, total - max(1, total // 3) :] = 0
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)[:, past:]
    feeds = {
        "input_ids": rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64),
        "attention_mask": mask,
        "position_ids": positions.astype(np.int64),
    }
    for layer in range(LAYERS):
        for kv in ("key", "value"):
            shape = (batch, HEADS, past, HEAD_DIM)
            feeds[f"past_key_values.{layer}.{kv}"] = rng.standard_normal(shape).astype(np.float32)
    return feeds


FEEDS = [decoder_feeds(2, 5, 0), decoder_feeds(3, 4, 6, seed=1), decoder_feeds(4, 1, 7, seed=2)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    pytest.importorskip("optimum.exporters.onnx")
    from models.export import export_model

    path = tmp_path_factory.mktemp("gpt2") / "gpt2_tiny.onnx"
    export_model("gpt2", path, tiny=True)
    return path


@pytest.fixture(scope="module")
def cleaned(exported: Path) -> ir.Model:
    model = ir.load(exported)
    for _ in range(3):
        modified = False
        for name in CLEAN_UP:
            modified |= REGISTRY[name](Target())(model).modified
        if not modified:
            break
    return model


def test_feeds_reach_every_mask_case():
    """A query row that sees no key at all (past 0, left padding) and one with past > 0."""
    mask = FEEDS[0]["attention_mask"]
    assert mask[0, 0] == 0 and FEEDS[0]["past_key_values.0.key"].shape[2] == 0
    assert FEEDS[1]["past_key_values.0.key"].shape[2] == 6
    assert all(f["input_ids"].shape[0] >= 2 for f in FEEDS)


def test_attention_fused_in_every_layer(cleaned: ir.Model):
    softmaxes = sum(n.op_type == "Softmax" for n in cleaned.graph)
    assert softmaxes == LAYERS
    pass_ = FuseDecoderAttention()
    fused, result = apply_pass(pass_, cleaned)
    assert result.modified and pass_.matches == LAYERS and pass_.rejected == []
    ops = [n.op_type for n in fused.graph]
    assert ops.count("MultiHeadAttention") == LAYERS
    assert "Softmax" not in ops and ops.count("MatMul") == 1  # only the LM head is left
    for node in fused.graph:
        if node.op_type == "MultiHeadAttention":
            assert node.attributes.get_int("num_heads") == HEADS
            assert node.attributes.get_float("scale") == pytest.approx(HEAD_DIM**-0.5, 1e-6)
    # The signature is unchanged: names, and the cache outputs' declared shapes.
    assert [v.name for v in fused.graph.inputs] == [v.name for v in cleaned.graph.inputs]
    before = {v.name: [str(d) for d in v.shape] for v in cleaned.graph.outputs}
    after = {v.name: [str(d) for d in v.shape] for v in fused.graph.outputs}
    assert after == before
    # No schema for com.microsoft ops in the checker's strict inference: plain check only.
    onnx.checker.check_model(ir.to_proto(fused))
    assert_parity(cleaned, fused, FEEDS, **TOL)


def test_raw_export_is_rejected_with_the_reason(exported: Path):
    """Before fold_constants the scale is computed from Shape(q): nothing is fused, and why
    is recorded."""
    pass_ = FuseDecoderAttention()
    _, result = apply_pass(pass_, ir.load(exported))
    assert not result.modified
    assert len(pass_.rejected) == LAYERS
    assert all("non-constant" in reason for reason in pass_.rejected)


def test_portable_target_leaves_it(cleaned: ir.Model):
    pass_ = FuseDecoderAttention(Target("portable"))
    _, result = apply_pass(pass_, cleaned)
    assert not result.modified and pass_.blocked == LAYERS
