"""The data a quantization is decided and checked on, split so the check is honest.

Three roles, each recorded in the report (``Samples.roles``):

- **calibration**: activation ranges (int8-static) and GPTQ's Hessians;
- **decision**: what the guard and ``auto`` score candidates on to choose exclusions and tiers;
- **evaluation**: the final check, which no decision saw.

The user's data (``--calibration``) is split by a hash of each item's content: about one item in
``EVALUATION_EVERY`` is held out for evaluation, the rest calibrate and decide. Hashing content,
not position, means a duplicated item can never sit on both sides and a reordered folder splits
the same way. ``--evaluation`` names held-out data explicitly (then all of ``--calibration``
calibrates; items found in both are dropped from evaluation).

Items are input sets (``.npz`` files, or all ``.npy`` files of a folder as one set) or text:
``.txt`` files, one sample per non-empty line, tokenized with the ``tokenizer.json`` beside the
model (or in the data folder, or ``--tokenizer``) into batches of ``TEXT_BATCH`` lines padded to
the longest. A causal LM's text is not batched: the LM guard scores perplexity on it
(``Samples.text``).

Without data, the verification sets (generated from the model's signature) serve every role,
and the report says so: figures on random inputs say little about real ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from pipeline import lm_quality
from pipeline.quantization import calibration
from pipeline.quantization.lm_guard import tokenizer_beside
from pipeline.runtime.errors import UserError

EVALUATION_EVERY = 4
TEXT_BATCH = 8
MAX_TOKENS = 128
Feeds = dict[str, np.ndarray]


@dataclass
class Samples:
    """Input sets per role, and where each came from."""

    calibration: list[calibration.Source]
    decision: list[Feeds]
    evaluation: list[Feeds]
    roles: dict[str, str] = field(default_factory=dict)
    generated: bool = False  # calibration ranges would come from random inputs
    text: tuple[str, str] | None = None  # a causal LM's (calibration, evaluation) text
    held_out: bool = False  # evaluation shares nothing with calibration/decision


def held_out(content: bytes) -> bool:
    """Whether an item with this content belongs to the evaluation split."""
    return hashlib.sha256(content).digest()[0] % EVALUATION_EVERY == 0


def _split(items: list, contents: list[bytes]) -> tuple[list, list]:
    """(calibration, evaluation) by content hash; at least one item on each side when there
    are two or more (the item with the smallest hash is held out if none was)."""
    keep, evaluate = [], []
    for item, content in zip(items, contents, strict=True):
        (evaluate if held_out(content) else keep).append(item)
    if not evaluate and len(items) >= 2:
        first = min(range(len(items)), key=lambda i: hashlib.sha256(contents[i]).digest())
        evaluate = [items[first]]
        keep = [item for i, item in enumerate(items) if i != first]
    return keep, evaluate


def _text_lines(path: Path) -> list[str] | None:
    files = [path] if path.is_file() and path.suffix == ".txt" else sorted(path.glob("*.txt"))
    if path.is_file() and path.suffix != ".txt" or not files:
        return None
    lines = []
    for file in files:
        try:
            lines += [line.strip() for line in file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read text data {file}: {exc}") from exc
    if not lines:
        raise UserError(f"text data in {path} has no non-empty line")
    return lines


def _source_bytes(source: calibration.Source) -> bytes:
    return calibration.digest([source]).encode()


def find_tokenizer(model_path: Path | None, data: Path, given: Path | None) -> Path:
    """``--tokenizer``, else ``tokenizer.json`` beside the model, else in the data folder."""
    folder = data if data.is_dir() else data.parent
    candidates = [given] if given is not None else []
    if model_path is not None:
        candidates.append(tokenizer_beside(model_path))
    candidates.append(folder / "tokenizer.json")
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate
    raise UserError(
        f"text data in {data} needs a tokenizer: pass --tokenizer tokenizer.json or put it "
        "beside the model"
    )


def tokenize(lines: list[str], tokenizer_path: Path, model: onnx.ModelProto) -> list[Feeds]:
    """Batches of ``TEXT_BATCH`` lines, padded to the longest, as the model's inputs."""
    tokenizer = lm_quality.load_tokenizer(tokenizer_path)
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_TOKENS)
    pad = tokenizer.token_to_id("[PAD]") or tokenizer.token_to_id("<pad>") or 0
    inputs = calibration.input_dtypes(model)
    batches = []
    for start in range(0, len(lines), TEXT_BATCH):
        encoded = [e.ids for e in tokenizer.encode_batch(lines[start : start + TEXT_BATCH])]
        width = max(len(ids) for ids in encoded)
        ids = np.full((len(encoded), width), pad, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for row, sequence in enumerate(encoded):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        feeds: Feeds = {}
        for name, dtype in inputs.items():
            if "input_ids" in name:
                value = ids
            elif "mask" in name:
                value = mask
            elif "token_type" in name:
                value = np.zeros_like(ids)
            elif "position_ids" in name:
                value = np.broadcast_to(np.arange(width), ids.shape).copy()
            else:
                raise UserError(
                    f"text data cannot feed the model input {name!r}: pass input sets "
                    "(.npz) instead"
                )
            feeds[name] = value.astype(dtype)
        batches.append(feeds)
    return batches


def _read(sources: list[calibration.Source]) -> list[Feeds]:
    return [calibration.read_source(s) for s in sources]


def load(
    model: onnx.ModelProto,
    model_path: Path | None,
    calibration_dir: Path | None,
    evaluation_dir: Path | None,
    tokenizer: Path | None,
    fallback: list[Feeds],
    causal_lm: bool = False,
) -> Samples:
    """The samples for each role (see the module docstring). ``causal_lm``: text is for the
    LM guard (perplexity), not tokenized into input sets.

    ``fallback`` (the verification sets) serves decision and evaluation when no data is
    given, and calibration gets generated sets (``generated`` True).
    """
    if calibration_dir is None:
        if evaluation_dir is not None:
            raise UserError("--evaluation needs --calibration (the data decisions are made on)")
        return Samples(
            calibration.generated_sources(model),
            list(fallback),
            list(fallback),
            roles={
                "calibration": "generated random inputs",
                "decision": "the verification input sets (generated)",
                "evaluation": "the verification input sets (generated), against the original",
            },
            generated=True,
        )
    lines = _text_lines(Path(calibration_dir))
    if lines is not None:
        if causal_lm:
            return _lm_text(lines, calibration_dir, evaluation_dir, fallback)
        tokenizer_path = find_tokenizer(model_path, Path(calibration_dir), tokenizer)
        return _text_samples(model, lines, calibration_dir, evaluation_dir, tokenizer_path)
    sources = calibration.load_sources(Path(calibration_dir))
    contents = [_source_bytes(s) for s in sources]
    if evaluation_dir is not None:
        extra = calibration.load_sources(Path(evaluation_dir))
        seen = set(contents)
        evaluation = [s for s in extra if _source_bytes(s) not in seen]
        keep = sources
        origin = f"--evaluation {evaluation_dir}: {len(evaluation)} set(s)"
        if len(evaluation) < len(extra):
            origin += f" ({len(extra) - len(evaluation)} also in --calibration, dropped)"
    else:
        keep, evaluation = _split(sources, contents)
        origin = (
            f"--calibration {calibration_dir}: {len(evaluation)} of {len(sources)} set(s) "
            "held out by content hash"
        )
    return _samples(keep, evaluation, f"--calibration {calibration_dir}", origin)


def _samples(keep, evaluation, where: str, origin: str) -> Samples:
    decision = _read(keep)
    if not evaluation:  # one item only: nothing can be held out
        return Samples(
            keep,
            decision,
            decision,
            roles={
                "calibration": f"{where}: {len(keep)} set(s)",
                "decision": "the same set(s)",
                "evaluation": "the same set(s): too little data to hold any out",
            },
        )
    return Samples(
        keep,
        decision,
        _read(evaluation),
        roles={
            "calibration": f"{where}: {len(keep)} set(s)",
            "decision": "the calibration set(s)",
            "evaluation": origin,
        },
        held_out=True,
    )


def _text_samples(model, lines, calibration_dir, evaluation_dir, tokenizer_path) -> Samples:
    if evaluation_dir is not None:
        held = _text_lines(Path(evaluation_dir))
        if held is None:
            raise UserError(
                f"--evaluation {evaluation_dir}: expected .txt files like --calibration"
            )
        seen = set(lines)
        evaluation = [line for line in held if line not in seen]
        keep = lines
        origin = f"--evaluation {evaluation_dir}: {len(evaluation)} line(s)"
    else:
        keep, evaluation = _split(lines, [line.encode() for line in lines])
        origin = (
            f"--calibration {calibration_dir}: {len(evaluation)} of {len(lines)} line(s) held "
            "out by content hash"
        )
    where = f"--calibration {calibration_dir} (text, {tokenizer_path.name})"
    samples = _samples(
        tokenize(keep, tokenizer_path, model),
        tokenize(evaluation, tokenizer_path, model) if evaluation else [],
        where,
        origin,
    )
    samples.roles["calibration"] = f"{where}: {len(keep)} line(s)"
    return samples


def _lm_text(lines, calibration_dir, evaluation_dir, fallback) -> Samples:
    """A causal LM's text, split by line; the LM guard tokenizes and windows it. The
    verification sets stay the input sets (``auto`` times candidates on them)."""
    if evaluation_dir is not None:
        held = _text_lines(Path(evaluation_dir)) or []
        seen = set(lines)
        keep, evaluation = lines, [line for line in held if line not in seen]
    else:
        keep, evaluation = _split(lines, [line.encode() for line in lines])
    if not evaluation:
        raise UserError(f"--calibration {calibration_dir}: too little text to hold any out")
    return Samples(
        [],
        list(fallback),
        list(fallback),
        roles={
            "calibration": f"--calibration {calibration_dir}: {len(keep)} line(s) of text",
            "decision": "the calibration text (perplexity and top-1 agreement)",
            "evaluation": f"{len(evaluation)} held-out line(s) of text",
        },
        text=("\n".join(keep), "\n".join(evaluation)),
        held_out=True,
    )
