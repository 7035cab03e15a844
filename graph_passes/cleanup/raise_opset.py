"""Raise the model's default-domain opset so standard fused ops become available.

LayerNormalization needs opset 17, Gelu 20, RMSNormalization and Attention 23. A model
exported at opset 14 can only get them after conversion, which ``onnx.version_converter``
does op by op (e.g. ReduceMean's ``axes`` attribute becomes an input at 18). The pass runs
when ``target.raise_opset_to`` is above the model's opset; it never lowers one.

The decoder rule: with ``raise_opset_to`` 0 (the default: no raise asked for), a model with
grouped-query attention over a KV cache (K and V read through ``repeat_kv``, see
``fusions/_repeat_kv.py``: Llama, Mistral, Qwen, SmolLM exports) is raised to 23
(``DECODER_OPSET``). Its attention has one fused form that is exact and runs every input
shape the export accepts: standard ``Attention`` (23), which takes KV heads shared by query
groups and a past with several new tokens at any batch size. ORT's GroupQueryAttention
refuses batch > 1 with a past and more than one new token, and MultiHeadAttention needs as
many KV heads as query heads. RotaryEmbedding and RMSNormalization come with 23 too. No
other model is touched by the rule (their default stays "never").

The conversion works on a serialized copy; the converted graph replaces the model's graph in
place, and every initializer is given back its original tensor object (so memory-mapped
external data stays mapped and nothing is copied). When the converter fails (an op without
a schema, a version it has no adapter for) the model is left exactly as it was, ``matches``
is 0 and the reason is logged and kept in ``self.failure``.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import onnx
import onnx.version_converter
import onnx_ir as ir

from graph_passes.base import GraphPass
from graph_passes.fusions._repeat_kv import has_grouped_kv_attention
from graph_passes.match import opset_of

logger = logging.getLogger(__name__)

DECODER_OPSET = 23  # what the decoder rule raises a grouped-query-attention model to


class RaiseOpset(GraphPass):
    """Convert the default-domain opset up to ``target.raise_opset_to``."""

    name: ClassVar[str] = "raise_opset"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        self.failure = ""
        wanted = self.target.raise_opset_to
        current = opset_of(model)
        if not wanted and 0 < current < DECODER_OPSET and has_grouped_kv_attention(model):
            wanted = DECODER_OPSET
            logger.info("grouped-query attention with a KV cache: raising the opset to 23")
        if not wanted or current == 0 or wanted <= current:
            return self.result(model)
        try:
            proto = ir.to_proto(model)
            converted = onnx.version_converter.convert_version(proto, wanted)
            _keep_value_info(proto.graph, converted.graph)
            new = ir.from_proto(converted)
        except Exception as exc:  # noqa: BLE001 - any converter failure keeps the model
            self.failure = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            logger.warning(
                "raise_opset: cannot convert opset %d to %d, model kept: %s",
                current,
                wanted,
                self.failure,
            )
            return self.result(model)
        originals = [dict(g.initializers) for g in model.graphs()]
        for old, graph in zip(originals, new.graphs(), strict=False):
            for name, value in graph.initializers.items():
                kept = old.get(name)
                if (
                    kept is not None
                    and kept.const_value is not None
                    and kept.dtype == value.dtype
                    and kept.shape == value.shape
                ):
                    value.const_value = kept.const_value
        model.graph = new.graph  # the model's opset_imports are its graph's: raised with it
        model.functions.clear()
        model.functions.update(new.functions)
        # New opsets need a newer IR version (opset 23 needs IR 11); the converter keeps the old.
        default = [onnx.helper.make_opsetid("", wanted)]
        model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(default))
        self.matches = 1
        logger.info("raised the default opset from %d to %d", current, wanted)
        return self.result(model)


def _keep_value_info(original: onnx.GraphProto, converted: onnx.GraphProto) -> None:
    """Give the converted graph the original's value_info, not the converter's.

    The converter runs shape inference and stores what it found, anonymous ``unk__N`` dims
    included; later inference keeps those instead of working the dims out again, and fusions
    that must prove two shapes equal (fuse_skip_layer_norm) then cannot (seen on MiniLM:
    6 of 12 SkipLayerNorms lost after raising 14 -> 17).
    """
    del converted.value_info[:]
    converted.value_info.extend(original.value_info)
