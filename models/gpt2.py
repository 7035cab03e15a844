"""GPT-2-style decoder with past key/values (``GPT2Config``), random weights.

The exported graph is the decoder-with-past step of generation: inputs ``input_ids`` and
``position_ids`` ``[batch, sequence]``, ``attention_mask`` ``[batch, past_sequence +
sequence]`` and
``past_key_values.N.key/value`` ``[batch, heads, past_sequence, head_dim]``; outputs
``logits`` and ``present.N.key/value`` (past + sequence long). A small wrapper turns the flat
past tensors into the ``DynamicCache`` transformers wants and the returned cache back into
flat tensors, so the classic exporter sees tensors only.

Full size is GPT2Config's defaults (12 layers, n_embd 768); ``tiny``: 2 layers, n_embd 64,
2 heads (the 50257-token vocabulary stays).
"""

from __future__ import annotations

import numpy as np

from models import common
from models.entry import Feeds, ZooEntry

VOCAB = 50257


def config(tiny: bool):
    from transformers import GPT2Config

    kwargs = {"n_layer": 2, "n_embd": 64, "n_head": 2} if tiny else {}
    cfg = GPT2Config(**kwargs)
    cfg._attn_implementation = "eager"
    return cfg


def _layers(tiny: bool) -> int:
    return 2 if tiny else 12


def _heads_dim(tiny: bool) -> tuple[int, int]:
    return (2, 32) if tiny else (12, 64)


def input_names(tiny: bool) -> tuple[str, ...]:
    past = [f"past_key_values.{i}.{kv}" for i in range(_layers(tiny)) for kv in ("key", "value")]
    return ("input_ids", "attention_mask", "position_ids", *past)


def output_names(tiny: bool) -> tuple[str, ...]:
    present = [f"present.{i}.{kv}" for i in range(_layers(tiny)) for kv in ("key", "value")]
    return ("logits", *present)


def build(tiny: bool):
    import torch
    from transformers import DynamicCache, GPT2LMHeadModel

    common.seeded()

    class DecoderWithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf_model = GPT2LMHeadModel(config(tiny)).eval()

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for layer in range(len(past) // 2):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.hf_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return DecoderWithPast().eval()


def example_inputs(tiny: bool, batch: int = 2, seq: int = 8) -> Feeds:
    """``past_sequence`` is ``seq - 3`` (5 and 10 for the two validation sets)."""
    rng = common.rng_for(batch, seq)
    past = max(1, seq - 3)
    heads, dim = _heads_dim(tiny)
    mask = common.padding_mask(batch, past + seq, keep_first=True)
    # As generate() computes them: count only the attended positions, padding gets 1.
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)[:, past:]
    feeds: Feeds = {
        "input_ids": common.token_ids(rng, VOCAB, batch, seq),
        "attention_mask": mask,
        "position_ids": positions.astype(np.int64),
    }
    for name in input_names(tiny)[3:]:
        feeds[name] = rng.standard_normal((batch, heads, past, dim)).astype(np.float32)
    return feeds


def _axes(layers: int) -> dict[str, dict[int, str]]:
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "past_sequence + sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for i in range(layers):
        for kv in ("key", "value"):
            axes[f"past_key_values.{i}.{kv}"] = {0: "batch", 2: "past_sequence"}
            axes[f"present.{i}.{kv}"] = {0: "batch", 2: "past_sequence + sequence"}
    return axes


ENTRY = ZooEntry(
    name="gpt2",
    family="decoder",
    description="GPT-2 decoder with past key/values (GPT2Config defaults), random weights",
    build=build,
    example_inputs=example_inputs,
    # Names of the full-size model; tiny (2 layers) uses the first entries of each kind.
    input_names=input_names(False),
    output_names=output_names(False),
    dynamic_axes=_axes(12),
    # torch-legacy fails in the mask code ("unordered_map::at"), torch-dynamo in torch.export;
    # Optimum patches both, so it is the only exporter listed.
    exporters=("optimum",),
    optimum_task="text-generation-with-past",
)
