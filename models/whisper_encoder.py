"""Whisper audio encoder (``WhisperConfig`` defaults: 80 mel bins, 3000 frames), random weights.

``input_features`` is ``float32[batch, 80, 3000]``; only batch is dynamic, because the
encoder requires exactly ``2 * max_source_positions`` frames. ``tiny``: 2 layers, d_model
64, 64 frames.
"""

from __future__ import annotations

from models import common
from models.entry import Feeds, ZooEntry


def config(tiny: bool):
    from transformers import WhisperConfig

    if tiny:
        return WhisperConfig(
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_source_positions=32,
        )
    return WhisperConfig()


def _frames(tiny: bool) -> int:
    return 64 if tiny else 3000


def build(tiny: bool):
    import torch
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    common.seeded()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = WhisperEncoder(config(tiny)).eval()

        def forward(self, input_features):
            return self.encoder(input_features=input_features, return_dict=True)[0]

    return Encoder().eval()


def example_inputs(tiny: bool, batch: int = 2, seq: int = 8) -> Feeds:
    """``seq`` is unused: the frame count is fixed by the model."""
    rng = common.rng_for(batch, seq)
    features = rng.standard_normal((batch, 80, _frames(tiny))).astype("float32")
    return {"input_features": features}


ENTRY = ZooEntry(
    name="whisper_encoder",
    family="encoder",
    description="Whisper audio encoder (WhisperConfig defaults), random weights",
    build=build,
    example_inputs=example_inputs,
    input_names=("input_features",),
    output_names=("last_hidden_state",),
    dynamic_axes={"input_features": {0: "batch"}, "last_hidden_state": {0: "batch"}},
    exporters=("torch-legacy", "torch-dynamo"),
)
