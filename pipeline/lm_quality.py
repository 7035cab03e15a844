"""Language-model quality on real text: perplexity and top-1 agreement with a reference.

Per-logit cosine says little about a language model: a quantized model can keep cosine 0.99+
on every logit vector and still pick another next token one time in three. What a user of an
LM feels is (1) perplexity on real text, ``exp(mean negative log-likelihood of the next
token)``, and (2) how often the greedy next token is the reference model's. Both are measured
here on windows of a tokenized text, each run as one prefill (no past) through the model's
own interface.

The text is the user's (any UTF-8 file) or, by default, English prose that ships with Python:
the topics of the Python reference manual (``pydoc_data.topics``, ~465k characters), split
by topic into a calibration part and an evaluation part that calibration never sees. A
different text gives different absolute perplexities; the ratio candidate / reference and
the agreement are what budgets are set on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.runtime.errors import UserError
from pipeline.runtime.sessions import Feeds, Session

SPLITS = ("calibration", "evaluation")
EVALUATION_EVERY = 4  # every 4th topic (sorted by name) is held out for evaluation


def bundled_text(split: str) -> str:
    """English prose for ``split`` ("calibration" or "evaluation"): disjoint sets of topics,
    and a paragraph the manual repeats in a calibration topic is left out of evaluation."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    parts = {
        held_out: [
            topics[n] for i, n in enumerate(names) if (i % EVALUATION_EVERY == 0) == held_out
        ]
        for held_out in (False, True)
    }
    calibration = "\n\n".join(parts[False])
    if split == "calibration":
        return calibration
    seen = {p.strip() for p in calibration.split("\n\n")}
    paragraphs = (p.strip() for text in parts[True] for p in text.split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p and p not in seen)


def load_tokenizer(path: Path):
    """The ``tokenizers`` tokenizer in the file ``path`` (a ``tokenizer.json``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path}: pass token ids or the HF folder")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def token_windows(ids: np.ndarray, length: int, count: int) -> list[np.ndarray]:
    """Up to ``count`` non-overlapping windows of ``length`` ids, spread over the whole text."""
    if length < 2:
        raise ValueError("a window needs at least 2 tokens (one prediction)")
    available = len(ids) // length
    if available == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    starts = np.linspace(0, available - 1, num=min(count, available)).round().astype(int)
    return [np.asarray(ids[s * length : (s + 1) * length], dtype=np.int64) for s in starts]


def prefill_feeds(session: Session, window: np.ndarray) -> Feeds:
    """Inputs that run ``window`` as one prefill through a decoder's own interface.

    Takes ``input_ids`` and, when the model has them, an all-ones ``attention_mask``,
    ``position_ids`` 0..L-1 and empty ``past_key_values.*`` (past length 0; the other dims
    read from the input's declared shape).
    """
    length = len(window)
    feeds: Feeds = {"input_ids": window[None, :]}
    for meta in session.inner.get_inputs():
        if meta.name == "attention_mask":
            feeds[meta.name] = np.ones((1, length), dtype=np.int64)
        elif meta.name == "position_ids":
            feeds[meta.name] = np.arange(length, dtype=np.int64)[None, :]
        elif meta.name.startswith("past"):
            dims = [d if isinstance(d, int) else 0 for d in meta.shape]
            dims[0] = 1
            dtype = np.float16 if "float16" in meta.type else np.float32
            feeds[meta.name] = np.zeros(dims, dtype=dtype)
        elif meta.name != "input_ids":
            raise UserError(f"cannot score an LM with an input named {meta.name!r}")
    return feeds


@dataclass(frozen=True)
class Scores:
    """What one model predicts on the windows."""

    nll_sum: float  # sum of -log p(next token) over every scored position
    tokens: int  # scored positions
    greedy: np.ndarray  # argmax next-token id at every scored position

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)


def score(session: Session, windows: list[np.ndarray]) -> Scores:
    """Negative log-likelihood of each next token and the greedy choice, over ``windows``."""
    nll, tokens, greedy = 0.0, 0, []
    for window in windows:
        logits = np.asarray(session.run(prefill_feeds(session, window))["logits"])[0, :-1]
        logits = logits.astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=-1))
        targets = window[1:]
        nll += float((log_z - shifted[np.arange(len(targets)), targets]).sum())
        tokens += len(targets)
        greedy.append(logits.argmax(axis=-1))
    return Scores(nll, tokens, np.concatenate(greedy))


@dataclass(frozen=True)
class LmQuality:
    """A candidate LM against its reference on the same windows."""

    reference_perplexity: float
    perplexity: float
    top1_agreement: float  # fraction of positions where both pick the same next token
    tokens: int

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity

    def describe(self) -> str:
        return (
            f"perplexity {self.perplexity:.3f} vs {self.reference_perplexity:.3f} "
            f"({(self.perplexity_ratio - 1) * 100:+.1f}%), top-1 agreement "
            f"{self.top1_agreement:.3f} over {self.tokens} tokens"
        )


def compare(reference: Scores, candidate: Scores) -> LmQuality:
    """The candidate's quality relative to the reference (scored on the same windows)."""
    if reference.tokens != candidate.tokens:
        raise ValueError("reference and candidate were scored on different windows")
    agreement = float(np.mean(reference.greedy == candidate.greedy))
    return LmQuality(reference.perplexity, candidate.perplexity, agreement, reference.tokens)
