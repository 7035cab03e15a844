"""Which intermediate channels go: activation-aware scores and their share per block.

A channel's score is the output energy the block loses when that channel alone is removed,
measured on calibration activations (``moments``): removing channel ``j`` takes
``h_j W_down[j, :]`` out of every token's output, whose energy summed over tokens is
``sum(h_j^2) * ||W_down[j, :]||^2`` (Wanda / FLAP: activation norm times weight norm, never
weight magnitude alone). When the down projection is refitted (``reconstruct``), the
channel's mean is absorbed by the bias, so what is lost is its *fluctuation*:
``sum((h_j - mean h_j)^2) * ||W_down[j, :]||^2`` (FLAP's fluctuation metric). A channel that
is large but nearly constant is then cheap to remove, which plain removal cannot exploit.

Blocks differ in how much they can give. A block's error lands in the residual stream it is
added to, and what follows sees it relative to that stream, so each score is divided by the
energy of the block's residual stream on the same tokens: the channels with the lowest
shares go first over ALL blocks, which gives each block its own fraction, at most ``SPREAD``
times the overall one (and ``MAX_BLOCK_FRACTION``), so that no block is emptied on the
strength of a calibration set. Where a block's residual stream is not found, every block
loses the same fraction. Measured at ffn=0.2 with the refit (held-out data):

| allocation | MiniLM pooled cosine | SmolLM2 perplexity |
| --- | ---: | ---: |
| same fraction in every block | 0.9691 | +16.3% |
| global, scores / block output energy, at most 2x | 0.9750 | +22.8% |
| global, scores / residual energy, at most 2x | 0.9745 | +15.6% |
| global, scores / residual energy, at most 1.5x (this) | 0.9745 | +12.7% |
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# No block loses more than SPREAD times the overall share of channels, nor more than
# MAX_BLOCK_FRACTION of them, however low their scores.
SPREAD = 1.5
MAX_BLOCK_FRACTION = 0.9


def channel_scores(gram: np.ndarray, weight: np.ndarray, centered: bool) -> np.ndarray:
    """Per channel, the block's output energy lost when it alone is removed (see the module
    docstring). ``gram`` is ``moments``' G."""
    width = weight.shape[0]
    energy = np.diag(gram)[:width].copy()
    if centered:
        energy -= gram[:width, width] ** 2 / max(gram[width, width], 1.0)
    return np.maximum(energy, 0.0) * (weight.astype(np.float64) ** 2).sum(axis=1)


def allocate(
    scores: Sequence[np.ndarray], residual: np.ndarray, fraction: float
) -> list[np.ndarray]:
    """The channels each block keeps (sorted indices) when ``fraction`` of all channels go:
    lowest share of the residual energy first over all blocks, no block losing more than
    its cap (the same fraction for every block where a residual energy is unknown)."""
    if np.all(np.isfinite(residual)):
        cap = min(MAX_BLOCK_FRACTION, SPREAD * fraction)
        shares = [
            s / max(r, np.finfo(np.float64).tiny) for s, r in zip(scores, residual, strict=True)
        ]
    else:
        cap, shares = fraction, list(scores)
    widths = [len(s) for s in shares]
    limits = [int(np.floor(cap * w)) for w in widths]
    target = int(round(fraction * sum(widths)))
    order = np.argsort(np.concatenate(shares), kind="stable")
    owner = np.repeat(np.arange(len(shares)), widths)
    offsets = np.concatenate([[0], np.cumsum(widths)[:-1]])
    removed: list[list[int]] = [[] for _ in shares]
    taken = 0
    for flat in order:
        if taken == target:
            break
        block = owner[flat]
        if len(removed[block]) < limits[block]:
            removed[block].append(int(flat - offsets[block]))
            taken += 1
    return [np.setdiff1d(np.arange(w), gone) for w, gone in zip(widths, removed, strict=True)]
