"""BERT-base encoder from ``BertConfig`` defaults (12 layers, hidden 768), random weights.

``tiny``: 2 layers, hidden 64, 2 heads, intermediate 128 (the vocabulary stays 30522 so
the embedding table, and the ids it is indexed with, keep their real size).
"""

from __future__ import annotations

import numpy as np

from models import common
from models.entry import Feeds, ZooEntry

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("last_hidden_state", "pooler_output")


def config(tiny: bool):
    from transformers import BertConfig

    if tiny:
        return BertConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128
        )
    return BertConfig()


def build(tiny: bool):
    import torch
    from transformers import BertModel

    common.seeded()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf_model = BertModel(config(tiny)).eval()

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.hf_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=True,
            )
            return out.last_hidden_state, out.pooler_output

    return Encoder().eval()


def example_inputs(tiny: bool, batch: int = 2, seq: int = 8) -> Feeds:
    rng = common.rng_for(batch, seq)
    mask = common.padding_mask(batch, seq)
    types = np.zeros((batch, seq), dtype=np.int64)
    types[:, seq // 2 :] = 1  # a second segment
    return {
        "input_ids": common.token_ids(rng, 30522, batch, seq),
        "attention_mask": mask,
        "token_type_ids": types,
    }


_AXES = {0: "batch", 1: "sequence"}

ENTRY = ZooEntry(
    name="bert_base",
    family="encoder",
    description="BERT-base encoder (BertConfig defaults), random weights",
    build=build,
    example_inputs=example_inputs,
    input_names=INPUT_NAMES,
    output_names=OUTPUT_NAMES,
    dynamic_axes={
        "input_ids": _AXES,
        "attention_mask": _AXES,
        "token_type_ids": _AXES,
        "last_hidden_state": _AXES,
        "pooler_output": {0: "batch"},
    },
    exporters=("torch-legacy", "torch-dynamo", "optimum"),
    optimum_task="feature-extraction",
)
