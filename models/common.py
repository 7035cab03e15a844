"""Shared pieces of the zoo modules: bug-finding example inputs and the HF wrapper.

Masks follow the pipeline's input rules (``pipeline.runtime.inputs``): batch > 1 and, within one
batch of two, right padding, left padding and a hole, so a fused attention that assumes
right padding or a contiguous mask is caught by the export validation.
"""

from __future__ import annotations

import numpy as np

SEED = 0


def rng_for(batch: int, seq: int) -> np.random.Generator:
    """A generator seeded by the shape, so each input set differs but is reproducible."""
    return np.random.default_rng([SEED, batch, seq])


def padding_mask(batch: int, length: int, *, keep_first: bool = False) -> np.ndarray:
    """``int64[batch, length]`` rows cycling: right padding, left padding + a hole, a hole.

    No row is ever fully masked (that is undefined behaviour in most attention kernels).
    ``keep_first`` keeps position 0 unmasked in every row (causal decoders: a query at
    position 0 must see at least itself).
    """
    mask = np.ones((batch, length), dtype=np.int64)
    pad = max(1, length // 3)
    for row in range(batch):
        pattern = row % 3
        if pattern == 0:  # right padding
            mask[row, length - pad :] = 0
        elif pattern == 1:  # left padding, and a hole in what is left
            mask[row, :pad] = 0
            mask[row, min(length - 2, pad + 1)] = 0
        else:  # holes
            mask[row, 1:-1:3] = 0
    if keep_first:
        mask[:, 0] = 1
    return mask


def token_ids(rng: np.random.Generator, vocab: int, batch: int, seq: int) -> np.ndarray:
    """``int64[batch, seq]`` ids spread over the whole vocabulary (first and last id included)."""
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    ids[0, 0] = 0
    ids[-1, -1] = vocab - 1
    return ids


def image(rng: np.random.Generator, batch: int, size: int, channels: int = 3) -> np.ndarray:
    """``float32[batch, channels, size, size]``, roughly normalized pixel values."""
    return rng.standard_normal((batch, channels, size, size)).astype(np.float32)


def seeded() -> None:
    """Seed torch so random-weight models are the same on every build."""
    import torch

    torch.manual_seed(SEED)


def randomize_batchnorm(module) -> None:
    """Give every BatchNorm non-trivial running stats and affine parameters.

    Fresh BatchNorm layers are the identity in eval mode (mean 0, var 1, gamma 1, beta 0),
    which hides a wrongly folded BatchNorm; random stats do not.
    """
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            with torch.no_grad():
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.2, 0.2)
