"""Second moments of each feed-forward block's intermediate activations on calibration data.

Everything pruning decides comes from one matrix per block, ``G = [h, 1]^T [h, 1]`` summed
over the calibration tokens in float64 (``h`` the down projection's input, one row per
token, a ones column appended): its diagonal holds each channel's energy ``sum h_j^2``, its
last column the channel sums (so the means), and least squares on the kept channels needs
nothing else (``reconstruct``). It is ``(I + 1)^2`` numbers per block whatever the amount
of data, so memory stays bounded: the model runs once per input set with every ``h`` as an
extra output, and each set's activations are folded in and dropped.

Beside it, the energy of the residual stream each block's output is added to
(``FfnBlock.residual``, summed ``||r||^2`` over the same tokens): what a block's error is
compared with (``importance``).

A layer cut whole (``layers``) needs less: the mean of each sublayer's contribution to the
residual stream (``means``), probed the same way. 2:4 sparsity (``sparse``) needs each
input channel's energy ``sum x_k^2`` at every weight's MatMul (``energies``): a diagonal,
where the FFN blocks keep the whole ``G``.

Padding is not a token: where the model takes an attention mask ``[batch, seq]`` and ``h``
is ``[batch, seq, I]``, only the positions the mask keeps are counted (a padded position's
activations are whatever the model computes from nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pipeline.pruning.ffn import FfnBlock
from pipeline.quantization.guard import mask_input
from pipeline.runtime.sessions import Feeds, Session, create_session


def tokens(hidden: np.ndarray, feeds: Feeds) -> np.ndarray:
    """The rows of ``hidden`` ``[..., I]`` that are real tokens, as ``[n, I]``."""
    name = mask_input(feeds)
    if name is not None and hidden.ndim == 3 and np.shape(feeds[name]) == hidden.shape[:2]:
        return hidden[np.asarray(feeds[name]) != 0]
    return hidden.reshape(-1, hidden.shape[-1])


def augmented_gram(rows: np.ndarray) -> np.ndarray:
    """``[rows, 1]^T [rows, 1]`` in float64."""
    augmented = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.float64)
    augmented[:, :-1] = rows
    augmented[:, -1] = 1.0
    return augmented.T @ augmented


@dataclass
class Moments:
    """Per block: ``G`` and the residual stream's energy (NaN where it was not found)."""

    grams: list[np.ndarray]
    residual: np.ndarray

    def __add__(self, other: Moments) -> Moments:
        grams = [a + b for a, b in zip(self.grams, other.grams, strict=True)]
        return Moments(grams, self.residual + other.residual)

    @property
    def tokens(self) -> int:
        return int(self.grams[0][-1, -1]) if self.grams else 0


def collect(
    model: ir.Model,
    blocks: Sequence[FfnBlock],
    groups_for: Callable[[Session], Sequence[Iterable[Feeds]]],
) -> list[Moments]:
    """``Moments`` per group of input sets. ``groups_for`` gives the groups for the session
    (a causal LM's prefill feeds follow its inputs' declared shapes); one session serves
    them all (``_probing``: ``model`` is left as it was).
    """
    wanted = [b.hidden for b in blocks] + [b.residual for b in blocks if _readable(b.residual)]
    session = _probing(model, wanted)
    result = []
    for group in groups_for(session):
        grams = [np.zeros((b.width + 1, b.width + 1), dtype=np.float64) for b in blocks]
        residual = np.array([0.0 if _readable(b.residual) else np.nan for b in blocks])
        for feed in group:
            outputs = session.run(feed)
            for index, block in enumerate(blocks):
                hidden = tokens(np.asarray(outputs[block.hidden.name]), feed)
                grams[index] += augmented_gram(hidden)
                if _readable(block.residual):
                    stream = tokens(np.asarray(outputs[block.residual.name]), feed)
                    residual[index] += float(np.square(stream, dtype=np.float64).sum())
        result.append(Moments(grams, residual))
    return result


def means(
    model: ir.Model,
    values: Sequence[ir.Value],
    groups_for: Callable[[Session], Sequence[Iterable[Feeds]]],
) -> list[Means]:
    """``Means`` of ``values`` ``[..., H]`` per group of input sets (as ``collect``): all a
    cut layer needs (``layers``), without a Gram matrix per value."""
    session = _probing(model, values)
    result = []
    for group in groups_for(session):
        sums = [np.float64(0.0)] * len(values)
        count = 0
        for feed in group:
            outputs = session.run(feed)
            for index, value in enumerate(values):
                rows = tokens(np.asarray(outputs[value.name]), feed)
                sums[index] = sums[index] + rows.sum(axis=0, dtype=np.float64)
            count += len(rows)
        result.append(Means(sums, count))
    return result


def energies(
    model: ir.Model,
    values: Sequence[ir.Value],
    groups_for: Callable[[Session], Sequence[Iterable[Feeds]]],
) -> list[np.ndarray]:
    """Per value ``[..., K]``, ``sum x_k^2`` (float64) over the real tokens of all the input
    sets of every group: one run per set, as ``collect``. A graph input is read from the
    feeds (the session is not asked to return what it is given)."""
    unique = list(dict.fromkeys(values))
    session = _probing(model, [v for v in unique if not v.is_graph_input()])
    totals = {v: np.float64(0.0) for v in unique}
    for group in groups_for(session):
        for feed in group:
            outputs = session.run(feed)
            for value in unique:
                array = feed[value.name] if value.is_graph_input() else outputs[value.name]
                rows = tokens(np.asarray(array), feed)
                totals[value] = totals[value] + np.square(rows, dtype=np.float64).sum(axis=0)
    return [totals[v] for v in values]


@dataclass
class Means:
    """Per value, its sum over ``count`` tokens."""

    sums: list[np.ndarray]
    count: int

    def __add__(self, other: Means) -> Means:
        sums = [a + b for a, b in zip(self.sums, other.sums, strict=True)]
        return Means(sums, self.count + other.count)

    @property
    def values(self) -> list[np.ndarray]:
        return [total / max(self.count, 1) for total in self.sums]


def _probing(model: ir.Model, values: Sequence[ir.Value]) -> Session:
    """A session on ``model`` that also returns ``values``: they become graph outputs for
    it and are taken off again, so ``model`` is left as it was."""
    added = [v for v in dict.fromkeys(values) if not v.is_graph_output()]
    for index, value in enumerate(values):
        value.name = value.name or f"prune_probe_{index}"
    model.graph.outputs.extend(added)
    try:
        return create_session(model, optimization="all")
    finally:
        for _ in added:  # pop, not del: onnx-ir only tracks graph outputs through pop
            model.graph.outputs.pop()


def _readable(value: ir.Value | None) -> bool:
    """A value the session can return (a graph input is fed, not computed)."""
    return value is not None and not value.is_graph_input()
