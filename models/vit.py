"""ViT image encoder (``ViTConfig`` defaults: 224x224, patch 16, 12 layers), random weights.

``pixel_values`` is ``float32[batch, 3, 224, 224]``; only batch is dynamic (the position
embeddings fix the image size). ``tiny``: 32x32 images, patch 8, 2 layers, hidden 64.
"""

from __future__ import annotations

from models import common
from models.entry import Feeds, ZooEntry


def config(tiny: bool):
    from transformers import ViTConfig

    if tiny:
        return ViTConfig(
            image_size=32,
            patch_size=8,
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            intermediate_size=128,
        )
    return ViTConfig()


def build(tiny: bool):
    import torch
    from transformers import ViTModel

    common.seeded()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf_model = ViTModel(config(tiny), add_pooling_layer=False).eval()

        def forward(self, pixel_values):
            return self.hf_model(pixel_values=pixel_values, return_dict=True).last_hidden_state

    return Encoder().eval()


def example_inputs(tiny: bool, batch: int = 2, seq: int = 8) -> Feeds:
    """``seq`` is unused: the image size is fixed by the model."""
    return {"pixel_values": common.image(common.rng_for(batch, seq), batch, 32 if tiny else 224)}


ENTRY = ZooEntry(
    name="vit",
    family="vision",
    description="ViT-Base/16 image encoder (ViTConfig defaults), random weights",
    build=build,
    example_inputs=example_inputs,
    input_names=("pixel_values",),
    output_names=("last_hidden_state",),
    dynamic_axes={"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}},
    exporters=("torch-legacy", "torch-dynamo"),
)
