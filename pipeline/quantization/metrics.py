"""The accuracy metric a quantization budget is held to: the one the user means.

A lowered model is judged by comparing its outputs with the fp32 model's on the same inputs.
Which comparison matters depends on what the outputs are for, and a stricter proxy gives
speed away: per-token cosine of MiniLM's ``last_hidden_state`` made the guard keep 14 of 36
MatMuls in fp32 where the mean-pooled sentence embeddings users compare were already within
budget. So the metric is named (``--metric``):

- ``cosine``: per-vector cosine of every float output, padding not scored (``guard.accuracy_of``;
  the worst output decides). The default, and the strictest general-purpose choice.
- ``pooled-cosine``: sentence embeddings, i.e. the first float output ``[batch, seq, hidden]``
  mean-pooled over the attention mask (an output that is already ``[batch, hidden]`` is taken
  as it is), cosine per sample. A mean cosine hides rank flips, which retrieval users feel, so
  nearest-neighbour agreement (is each sample's most similar other sample unchanged) must
  also reach ``min_neighbour_agreement`` (default 0.95, over at least ``MIN_NEIGHBOUR_SAMPLES``
  samples; fewer cannot tell one flip from noise), as the LM guard pairs perplexity with top-1.
- ``top1``: argmax agreement of a logits output (``logits`` when named so, else the first
  float output of rank >= 2) over the positions the mask keeps.
- ``perplexity``: causal LMs scored on real text (``lm_guard``: perplexity ratio and top-1
  agreement); it is not computed from feeds, so this module only names it.
- ``MODULE:FUNCTION`` or ``FILE.py:FUNCTION``: the user's scorer, called as
  ``function(reference, candidate, feeds)`` with three equally long lists of dicts (output or
  input name -> numpy array, one dict per input set) and returning the LOSS as a float:
  0.0 when the candidate is as good as fp32, larger when worse.

Every metric yields a ``Score`` whose ``drop`` the budget bounds (``--max-drop``):
``1 - value`` for the similarities, the loss itself for a plug-in.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.quantization import guard
from pipeline.runtime.errors import UserError

Feeds = dict[str, np.ndarray]
Outputs = Mapping[str, object]
BUILT_IN = ("cosine", "pooled-cosine", "top1", "perplexity")
TOLERANCE = 1e-12
MIN_NEIGHBOUR_AGREEMENT = 0.95
MIN_NEIGHBOUR_SAMPLES = 20


@dataclass(frozen=True)
class Score:
    """One candidate's accuracy against fp32 on one metric.

    ``value`` is the metric's own figure (a similarity where 1.0 means identical, or a
    plug-in's loss); ``drop`` is what the budget bounds. ``failure`` marks a result no budget
    excuses (an integer output that changed).
    """

    metric: str
    label: str  # how the value reads: "mean cosine", "mean pooled cosine", "loss", ...
    value: float
    similarity: bool = True
    where: str = ""  # " on 'logits'"
    values: dict[str, float] = field(default_factory=dict)  # flat figures for the report
    details: dict = field(default_factory=dict)
    failure: str | None = None

    @property
    def drop(self) -> float:
        return 1.0 - self.value if self.similarity else self.value

    def within(self, budget: float) -> bool:
        return self.failure is None and self.drop <= budget + TOLERANCE

    def summary(self, budget: float) -> str:
        if self.failure is not None:
            return self.failure
        if self.similarity:
            floor = 1.0 - budget
            relation = ">=" if self.value >= floor - TOLERANCE else "<"
            return f"{self.label} {self.value:.4f} {relation} {floor:.4f}{self.where}"
        relation = "<=" if self.within(budget) else ">"
        return f"{self.label} {self.value:.4g} {relation} {budget:.4g}{self.where}"

    def flat(self) -> dict[str, float]:
        return dict(self.values) or {self.metric: self.value}

    def to_dict(self) -> dict:
        return {"metric": self.metric, self.label: self.value, **self.details}


# ---------------------------------------------------------------- pure functions


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings ``[batch, dim]``: the mean of ``hidden`` over real tokens only.

    Padding positions carry hidden states too; sentence-transformers ignores them, and so
    must we, or the embedding of a short sentence would depend on its batch-mates.
    """
    weights = np.asarray(mask)[..., None].astype(np.float64)
    total = (np.asarray(hidden, np.float64) * weights).sum(1)
    return total / np.maximum(weights.sum(1), 1e-9)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return (a * b).sum(1) / norms


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """For each row, the index of the most cosine-similar OTHER row."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-30)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def nn_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of rows whose nearest other row is the same under both embeddings."""
    return float((nearest_neighbours(reference) == nearest_neighbours(candidate)).mean())


# ---------------------------------------------------------------- built-in metrics


def _float_outputs(outputs: Outputs) -> list[str]:
    return [
        name
        for name, value in outputs.items()
        if isinstance(value, np.ndarray) and value.dtype.kind == "f"
    ]


def _mask(feeds: Mapping[str, object]) -> np.ndarray | None:
    name = guard.mask_input(feeds)
    return None if name is None else np.asarray(feeds[name])


def cosine(reference, candidate, feeds) -> Score:
    """Per-vector cosine of every float output (``guard.accuracy_of``); worst output decides."""
    accuracy = guard.accuracy_of(reference, candidate, feeds)
    worst = accuracy.worst()
    changed = [
        o.name for o in accuracy.outputs.values() if o.kind == "exact" and o.match_fraction != 1.0
    ]
    failure = f"integer output(s) changed: {', '.join(changed)}" if changed else None
    if worst is None:
        return Score("cosine", "mean cosine", 1.0, failure=failure, details=accuracy.to_dict())
    where = f" on '{worst.name}'" + (" (padding not scored)" if worst.masked_by else "")
    return Score(
        "cosine",
        "mean cosine",
        worst.mean_cosine,
        where=where,
        values=accuracy.flat(),
        details=accuracy.to_dict(),
        failure=failure,
    )


def _embedding_output(outputs: Outputs, mask: np.ndarray | None) -> str:
    """The output sentence embeddings come from: rank 2 [batch, dim] as it is, or rank 3
    [batch, seq, hidden] pooled over a mask of shape [batch, seq]."""
    for name in _float_outputs(outputs):
        value = outputs[name]
        if value.ndim == 2 or (value.ndim == 3 and (mask is None or value.shape[:2] == mask.shape)):
            return name
    raise UserError(
        "--metric pooled-cosine needs a float output [batch, dim] or [batch, seq, hidden] "
        "(sentence embeddings); this model has none"
    )


def _embeddings(outputs: Sequence[Outputs], feeds: Sequence[Mapping], name: str) -> np.ndarray:
    rows = []
    for out, feed in zip(outputs, feeds, strict=True):
        value = np.asarray(out[name])
        if value.ndim == 3:
            mask = _mask(feed)
            mask = np.ones(value.shape[:2]) if mask is None else mask
            value = mean_pool(value, mask)
        rows.append(np.asarray(value, np.float64).reshape(value.shape[0], -1))
    return np.concatenate(rows)


def pooled_cosine(
    reference, candidate, feeds, min_neighbour_agreement: float = MIN_NEIGHBOUR_AGREEMENT
) -> Score:
    """Cosine of mean-pooled sentence embeddings, per sample, with nearest-neighbour agreement
    held to ``min_neighbour_agreement`` (see the module docstring)."""
    name = _embedding_output(reference[0], _mask(feeds[0]))
    ref = _embeddings(reference, feeds, name)
    cand = _embeddings(candidate, feeds, name)
    if ref.shape != cand.shape:
        return Score("pooled-cosine", "mean pooled cosine", 0.0, failure="output shape changed")
    cosines = cosine_rows(np.nan_to_num(ref), np.nan_to_num(cand))
    cosines = np.where(np.isfinite(cand).all(axis=1), cosines, 0.0)
    details = {"samples": len(cosines), "min_pooled_cosine": float(cosines.min())}
    values = {"pooled_cosine": float(cosines.mean())}
    failure = None
    if len(ref) >= 3:
        values["nn_agreement"] = details["nn_agreement"] = nn_agreement(ref, cand)
    if len(ref) >= MIN_NEIGHBOUR_SAMPLES and values["nn_agreement"] < min_neighbour_agreement:
        failure = (
            f"nearest-neighbour agreement {values['nn_agreement']:.3f} < "
            f"{min_neighbour_agreement:.3f} over {len(ref)} samples (mean pooled cosine "
            f"{values['pooled_cosine']:.4f})"
        )
    return Score(
        "pooled-cosine",
        "mean pooled cosine",
        values["pooled_cosine"],
        where=f" on '{name}' ({len(cosines)} samples)",
        values=values,
        details=details,
        failure=failure,
    )


def _logits_output(outputs: Outputs) -> str:
    names = [n for n in _float_outputs(outputs) if np.asarray(outputs[n]).ndim >= 2]
    if "logits" in names:
        return "logits"
    if not names:
        raise UserError("--metric top1 needs a float output of rank >= 2 (logits); none here")
    return names[0]


def top1(reference, candidate, feeds) -> Score:
    """Argmax agreement over the last axis, on the positions the mask keeps."""
    name = _logits_output(reference[0])
    same = total = 0
    for ref_out, cand_out, feed in zip(reference, candidate, feeds, strict=True):
        ref, cand = np.asarray(ref_out[name]), np.asarray(cand_out[name])
        if ref.shape != cand.shape:
            return Score("top1", "top-1 agreement", 0.0, failure="output shape changed")
        agree = ref.argmax(axis=-1) == cand.argmax(axis=-1)
        mask = _mask(feed)
        if mask is not None and agree.shape == mask.shape:
            keep = mask != 0
            same, total = same + int(agree[keep].sum()), total + int(keep.sum())
        else:
            same, total = same + int(agree.sum()), total + agree.size
    value = same / total if total else 1.0
    return Score(
        "top1",
        "top-1 agreement",
        value,
        where=f" on '{name}' ({total} positions)",
        values={"top1_agreement": value},
        details={"positions": total},
    )


# ---------------------------------------------------------------- plug-ins and lookup


def _load_callable(spec: str) -> Callable:
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute:
        raise UserError(
            f"--metric {spec!r}: expected one of {', '.join(BUILT_IN)} or MODULE:FUNCTION "
            "(or FILE.py:FUNCTION)"
        )
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UserError(f"--metric {spec!r}: file not found: {path}")
            module_spec = importlib.util.spec_from_file_location(f"_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as exc:  # the user's code: any failure to import is a bad argument
        raise UserError(f"--metric {spec!r}: cannot import {target}: {exc}") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UserError(f"--metric {spec!r}: {target} has no function {attribute!r}")
    return function


@dataclass(frozen=True)
class Metric:
    """A named scorer: ``score(reference, candidate, feeds) -> Score``.

    ``from_feeds`` is False for ``perplexity``, which scores text (``lm_guard``), not the
    outputs of input sets.
    """

    name: str
    function: Callable | None

    @property
    def from_feeds(self) -> bool:
        return self.function is not None

    def score(self, reference, candidate, feeds) -> Score:
        if self.name in BUILT_IN:
            return self.function(reference, candidate, feeds)
        try:
            loss = float(self.function(list(reference), list(candidate), list(feeds)))
        except Exception as exc:
            raise UserError(f"metric plug-in {self.name} raised: {exc}") from exc
        if not math.isfinite(loss) or loss < 0:
            raise UserError(
                f"metric plug-in {self.name} returned {loss}: a loss must be finite and >= 0 "
                "(0 = as good as fp32)"
            )
        return Score(self.name, "loss", loss, similarity=False, values={"loss": loss})


def resolve(spec: str, min_neighbour_agreement: float = MIN_NEIGHBOUR_AGREEMENT) -> Metric:
    """The metric named by ``--metric`` (a built-in or a plug-in, imported now so a bad name
    stops the run before any work)."""
    functions = {
        "cosine": cosine,
        "pooled-cosine": functools.partial(
            pooled_cosine, min_neighbour_agreement=min_neighbour_agreement
        ),
        "top1": top1,
    }
    if spec == "perplexity":
        return Metric(spec, None)
    if spec in functions:
        return Metric(spec, functions[spec])
    return Metric(spec, _load_callable(spec))


class Evaluator:
    """fp32 reference outputs computed once on ``feeds``; candidates scored against them."""

    def __init__(self, fp32_path: str | Path, feeds: Sequence[Feeds], metric: Metric) -> None:
        self.feeds = list(feeds)
        self.metric = metric
        sess = guard.session(str(fp32_path), "disable_all")
        self.reference = [guard.run(sess, f) for f in self.feeds]

    def measure(self, model_path: str | Path) -> Score:
        sess = guard.session(str(model_path), "all")
        candidate = [guard.run(sess, f) for f in self.feeds]
        return self.metric.score(self.reference, candidate, self.feeds)
