"""The quantization guard for a causal LM: perplexity and top-1 agreement on real text.

Per-logit cosine on generated inputs is the wrong yardstick for a language model: random token
ids and random past tensors put it where no user goes, and a cosine of 0.93 there says
nothing about the text it writes. SmolLM2-135M in affine int4 scores mean cosine 0.928 on the
verification sets yet perplexity +0.8% and top-1 agreement 0.963 on held-out prose. What an
LM user feels is what ``pipeline.lm_quality`` measures, so for a model with the
decoder-with-past interface and its ``tokenizer.json`` beside it, the guard decides on that:

- the candidate's perplexity may exceed the fp32 model's by ``max_perplexity_increase``
  (default 5%), and
- its greedy next token must agree with fp32's at ``min_top1`` of the positions (0.90),

both on the bundled calibration split; the report then states the same two figures on the
evaluation split, which no decision saw (``pipeline.lm_quality.bundled_text``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from pipeline import lm_quality
from pipeline.runtime.sessions import create_session

WINDOWS = 8  # windows of LENGTH tokens scored per candidate (~2000 predictions)
LENGTH = 256


@dataclass(frozen=True)
class LmBudget:
    """How far a lowered LM may drift from fp32 on real text."""

    max_perplexity_increase: float = 0.05
    min_top1: float = 0.90

    def __post_init__(self) -> None:
        if not 0 <= self.max_perplexity_increase < 10:
            raise ValueError(
                f"max perplexity increase must be in [0, 10), got {self.max_perplexity_increase}"
            )
        if not 0 <= self.min_top1 <= 1:
            raise ValueError(f"min top-1 agreement must be in [0, 1], got {self.min_top1}")


@dataclass(frozen=True)
class LmAccuracy:
    """A candidate's LM quality against fp32, with the budget it is held to.

    Same questions as ``guard.Accuracy`` (``within``, ``summary``, ``flat``, ``to_dict``); the
    cosine budget they are asked with does not apply to an LM and is ignored."""

    quality: lm_quality.LmQuality
    budget: LmBudget
    split: str
    metric = "perplexity"

    @property
    def drop(self) -> float:
        """The perplexity increase (0.05 = +5%): what the node ranking sorts by."""
        return self.quality.perplexity_ratio - 1

    def within(self, _cosine_budget: float | None = None) -> bool:
        ratio_ok = self.quality.perplexity_ratio <= 1 + self.budget.max_perplexity_increase
        return ratio_ok and self.quality.top1_agreement >= self.budget.min_top1

    def summary(self, _cosine_budget: float | None = None) -> str:
        verdict = "within" if self.within() else "outside"
        return (
            f"{self.quality.describe()} on the {self.split} text: {verdict} the LM budget "
            f"(perplexity +{self.budget.max_perplexity_increase:.0%}, "
            f"top-1 >= {self.budget.min_top1:.2f})"
        )

    def flat(self) -> dict[str, float]:
        return {
            "perplexity_ratio": self.quality.perplexity_ratio,
            "top1_agreement": self.quality.top1_agreement,
        }

    def to_dict(self) -> dict:
        return {"split": self.split, **asdict(self.quality), "budget": asdict(self.budget)}


def is_causal_lm(model: onnx.ModelProto) -> bool:
    """The decoder-with-past interface: ``input_ids`` and ``past*`` in, ``logits`` out."""
    return has_causal_lm_interface(
        [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    )


def has_causal_lm_interface(inputs: list[str], outputs: list[str]) -> bool:
    """``is_causal_lm`` on the input and output names."""
    return (
        "input_ids" in inputs and any(n.startswith("past") for n in inputs) and "logits" in outputs
    )


TOKENIZER_SUFFIX = ".tokenizer.json"  # the zoo's export writes NAME.tokenizer.json beside NAME.onnx


def tokenizer_beside(model_path: Path) -> Path | None:
    """The tokenizer saved next to the model, if any: ``NAME.tokenizer.json`` (the zoo's
    batch export, several models to a folder) first, else ``tokenizer.json`` (optimum's)."""
    model_path = Path(model_path)
    for path in (model_path.with_suffix(TOKENIZER_SUFFIX), model_path.parent / "tokenizer.json"):
        if path.is_file():
            return path
    return None


class LmEvaluator:
    """fp32 scored once on ``text`` (the bundled ``split`` when None); each candidate scored
    on the same windows."""

    def __init__(
        self,
        fp32_path: Path,
        tokenizer: Path,
        budget: LmBudget,
        split: str,
        text: str | None = None,
    ) -> None:
        self.budget, self.split = budget, split
        text = lm_quality.bundled_text(split) if text is None else text
        ids = np.asarray(lm_quality.load_tokenizer(tokenizer).encode(text).ids)
        self.windows = lm_quality.token_windows(ids, LENGTH, WINDOWS)
        self.reference = self._score(fp32_path)

    def _score(self, path: Path) -> lm_quality.Scores:
        # from the file: no Python copy of a large model's weights
        return lm_quality.score(create_session(Path(path), optimization="all"), self.windows)

    def measure(self, model_path: str | Path) -> LmAccuracy:
        quality = lm_quality.compare(self.reference, self._score(Path(model_path)))
        return LmAccuracy(quality, self.budget, self.split)
