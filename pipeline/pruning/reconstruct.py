"""Reconstruction without training: the down projection refitted on the channels kept.

After channels are removed, the block's output ``h W + b`` is rebuilt as well as the kept
channels allow: ``W' [k, H]`` and an intercept ``c [H]`` minimize, over the calibration tokens,
``||h_K W' + c - h W||^2 + r ||W' - W_K||^2``. The normal equations need only the second
moments ``G`` (``moments``): with ``K'`` the kept rows plus the ones row,
``(G[K', K'] + r I_K) theta = G[K', :I] W + r [W_K; 0]``, solved in float64. The intercept is
added to the block's bias (``graph.Rewrite.down``: a fused residual norm's bias input, or an
``Add`` where there is none).

The ridge pulls ``W'`` towards the weights it had, not towards zero, and ``r`` is
``RIDGE`` times the mean kept-channel energy. Calibration sets are small (82 sentences of
MiniLM are 1025 tokens for 1229 kept channels), so an unregularized fit matches the
calibration tokens and nothing else: at ffn=0.2, held-out pooled cosine 0.90 with
``RIDGE`` 1e-3 against 0.93 for plain removal. Pulled towards ``W_K``: 0.9750 (0.3), 0.9743
(1), 0.9728 (3); only the intercept fitted (``r`` infinite, FLAP's bias compensation):
0.9658. A two-fold validation of ``r`` per block chose 0.3..3 and gained nothing measurable.

``relative_error`` is the block-output error on the calibration tokens of any choice of
``(W', c)`` as a share of the block's output energy, from ``G`` alone: the report states it
with and without the refit, which is how much reconstruction buys per block.
"""

from __future__ import annotations

import numpy as np

RIDGE = 0.3


def refit(
    gram: np.ndarray, weight: np.ndarray, keep: np.ndarray, ridge: float = RIDGE
) -> tuple[np.ndarray, np.ndarray]:
    """``(W' [k, H], c [H])``: least squares of the block output on the kept channels, with
    ``W'`` pulled towards the kept rows of ``W`` by ``ridge`` (relative to the mean kept
    channel energy; ``inf``: ``W'`` is ``W``'s kept rows and only ``c`` is fitted)."""
    width = weight.shape[0]
    weight = weight.astype(np.float64)
    rows = np.append(keep, width)
    system = gram[np.ix_(rows, rows)].copy()
    target = gram[rows, :width] @ weight
    if np.isinf(ridge):
        removed = np.setdiff1d(np.arange(width), keep)
        count = max(gram[width, width], 1.0)
        return weight[keep], gram[removed, width] @ weight[removed] / count
    kept = np.arange(len(keep))
    strength = ridge * max(float(np.mean(np.diag(system)[:-1])), 1e-30)
    system[kept, kept] += strength
    target[kept] += strength * weight[keep]
    try:
        theta = np.linalg.solve(system, target)
    except np.linalg.LinAlgError:
        theta = np.linalg.lstsq(system, target, rcond=None)[0]
    return theta[:-1], theta[-1]


def relative_error(
    gram: np.ndarray,
    weight: np.ndarray,
    keep: np.ndarray,
    new_weight: np.ndarray,
    intercept: np.ndarray | None,
) -> float:
    """``sum ||h_K W' + c - h W||^2 / sum ||h W||^2`` over the calibration tokens."""
    width = weight.shape[0]
    weight = weight.astype(np.float64)
    delta = np.zeros((width + 1, weight.shape[1]))
    delta[:width] = weight
    delta[keep] -= new_weight
    if intercept is not None:
        delta[width] -= intercept
    error = float(((gram @ delta) * delta).sum())
    output = float(((gram[:width, :width] @ weight) * weight).sum())
    return error / max(output, np.finfo(np.float64).tiny)
