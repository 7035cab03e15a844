"""What the plain-torch CNNs share: image inputs at two sizes and their dynamic axes."""

from __future__ import annotations

from models import common
from models.entry import Feeds

DYNAMIC_AXES = {
    "pixel_values": {0: "batch", 2: "height", 3: "width"},
    "logits": {0: "batch"},
}


def image_side(tiny: bool, seq: int) -> int:
    """``seq`` 8 -> 32 (tiny) / 224; any other ``seq`` gives another size (13 -> 52 / 364),
    so the validation tries the dynamic height/width at two sizes."""
    return (4 if tiny else 28) * seq


def example_inputs(tiny: bool, batch: int = 2, seq: int = 8) -> Feeds:
    rng = common.rng_for(batch, seq)
    return {"pixel_values": common.image(rng, batch, image_side(tiny, seq))}
