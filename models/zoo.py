"""The model zoo: every model the batch export and the CI job know, by name.

Each entry says how to build the PyTorch module (real weights for all-MiniLM-L6-v2, random
weights from a config for the rest), what its inputs look like, which axes are dynamic, and
which exporters it supports. ``tiny=True`` builds a few-layer, narrow version of the same
architecture: same graph patterns, seconds to export, which is what the tests use.

Exporting and validating against PyTorch lives in ``models.export``; this module only
describes. The registry is written out by hand.
"""

from __future__ import annotations

from models.entry import Feeds, ZooEntry

__all__ = ["ZOO", "Feeds", "ZooEntry"]


def _registry() -> dict[str, ZooEntry]:
    from models import (
        bert_base,
        gpt2,
        minilm_zoo,
        mobilenet,
        resnet,
        smollm2,
        vit,
        whisper_encoder,
    )

    entries = (
        minilm_zoo.ENTRY,
        bert_base.ENTRY,
        gpt2.ENTRY,
        smollm2.ENTRY,
        vit.ENTRY,
        whisper_encoder.ENTRY,
        resnet.ENTRY,
        mobilenet.ENTRY,
    )
    return {entry.name: entry for entry in entries}


ZOO: dict[str, ZooEntry] = _registry()
"""Name -> entry, written out by hand. Importing it imports numpy only: every family module
imports torch / transformers inside its functions."""
