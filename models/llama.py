"""A tiny random-weight Llama (GQA, RoPE, RMSNorm, SwiGLU, tied embeddings) exported by
optimum with its KV cache, and the decoder cases a fused export must reproduce.

``export_tiny(folder)`` builds the model in this process (no network: ``HF_HUB_OFFLINE``),
saves it and exports it with optimum's ``text-generation-with-past``: the graph is the same,
op for op, as the real SmolLM2-135M export (``models.smollm2``), only smaller (2 layers,
hidden 64, 4 query heads sharing 2 KV heads of size 16, vocabulary 256). It takes seconds.

``decoder_cases(session)`` makes the feeds that exercise every input shape the export accepts:
a batch-1 prefill and a cached decode step, a left-padded batch of 2 (prefill and decode),
and a batch of 2 with a past and 2 new tokens (the case GroupQueryAttention refuses). Pasts
come from running ``session`` (the original), as a generation loop would. ``max_diffs``
compares two sessions on those cases over valid positions only (left-padding rows are
undefined in the original: its pad queries attend to nothing).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from models import smollm2

# The zoo's tiny SmolLM2 (same Llama architecture) plus the token ids a tokenizer-less
# config needs.
TINY = {**smollm2.TINY, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def build_tiny(folder: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a random-weight LlamaForCausalLM (``TINY`` plus ``overrides``) into ``folder``.

    Weights are N(0, 0.2) and norm weights U(0.5, 1.5): the default init (std 0.02) gives
    near-uniform logits, where a wrong fusion would hide in the noise.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.2)
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder


def export(model_folder: str | os.PathLike, onnx_folder: str | os.PathLike) -> Path:
    """optimum's ``text-generation-with-past`` export of a saved model; the model.onnx path."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from optimum.exporters.onnx import main_export

    main_export(
        str(model_folder),
        output=str(onnx_folder),
        task="text-generation-with-past",
        do_validation=False,
        local_files_only=True,
    )
    return Path(onnx_folder) / "model.onnx"


def export_tiny(folder: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Build and export the tiny Llama under ``folder``; the model.onnx path."""
    folder = Path(folder)
    return export(build_tiny(folder / "hf", seed, **overrides), folder / "onnx")


def _layout(session) -> tuple[int, int, int, int]:
    """(layers, KV heads, head size, vocabulary) read from the session's I/O."""
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    key = next(i for i in pasts if i.name.endswith(".key"))
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else 256
    return len(pasts) // 2, key.shape[1], key.shape[3], vocab


def _feeds(ids, mask, past) -> dict[str, np.ndarray]:
    """One step's feeds; position ids as a generation loop makes them (cumsum of the mask)."""
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, -ids.shape[1] :]
    feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": mask.astype(np.int64),
        "position_ids": positions.astype(np.int64),
    }
    for i, (key, value) in enumerate(past):
        feeds[f"past_key_values.{i}.key"] = key
        feeds[f"past_key_values.{i}.value"] = value
    return feeds


def decoder_cases(session, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Feeds by case name: prefill / decode at batch 1, left-padded batch 2 prefill / decode,
    and batch 2 with a past of 5 and 2 new tokens (left-padded). Pasts come from ``session``."""
    layers, kv_heads, head_size, vocab = _layout(session)
    rng = np.random.default_rng(seed)
    names = [o.name for o in session.get_outputs()]
    cases = {}
    for tag, lengths, width in (("b1", [6], 6), ("b2_left_padded", [3, 6], 6)):
        batch = len(lengths)
        mask = np.zeros((batch, width), np.int64)
        for b, n in enumerate(lengths):
            mask[b, width - n :] = 1
        ids = rng.integers(3, vocab, (batch, width))
        empty = np.zeros((batch, kv_heads, 0, head_size), np.float32)
        prefill = _feeds(ids, mask, [(empty, empty)] * layers)
        cases[f"{tag}_prefill"] = prefill
        out = dict(zip(names, session.run(None, prefill), strict=True))
        past = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(layers)]
        for new in (1, 2):
            step_ids = rng.integers(3, vocab, (batch, new))
            step_mask = np.concatenate([mask, np.ones((batch, new), np.int64)], 1)
            name = f"{tag}_decode" if new == 1 else f"{tag}_past_{width}_plus_{new}"
            cases[name] = _feeds(step_ids, step_mask, past)
    return cases


def max_diffs(reference, candidate, cases: dict) -> dict[str, dict[str, float]]:
    """Max |difference| of the logits and of the presents, per case, over valid positions
    (query rows and cache slots where the attention mask is 1)."""
    names = [o.name for o in reference.get_outputs()]
    result = {}
    for case, feeds in cases.items():
        want = dict(zip(names, reference.run(None, feeds), strict=True))
        got = dict(zip(names, candidate.run(names, feeds), strict=True))
        mask = feeds["attention_mask"].astype(bool)
        rows = mask[:, -feeds["input_ids"].shape[1] :]
        logits = float(np.abs(want["logits"] - got["logits"])[rows].max())
        present = 0.0
        for name in names:
            if name.startswith("present."):
                diff = np.abs(want[name] - got[name]).transpose(0, 2, 1, 3)[mask]
                present = max(present, float(diff.max()))
        result[case] = {"logits": logits, "present": present}
    return result
