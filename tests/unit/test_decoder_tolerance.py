"""The decoder-LM verification budget (pipeline/verify.py): which outputs get it, and that it
still rejects a wrong result while accepting fp32 reassociation noise."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pipeline.runtime.compare import compare_sets
from pipeline.verify import DECODER_TOLERANCE, decoder_output_tolerances


def _model(inputs: list[str], outputs: list[str]) -> ir.Model:
    graph = ir.Graph(
        [ir.Value(name=n, type=ir.TensorType(ir.DataType.FLOAT)) for n in inputs],
        [ir.Value(name=n, type=ir.TensorType(ir.DataType.FLOAT)) for n in outputs],
        nodes=[],
        opset_imports={"": 17},
    )
    return ir.Model(graph, ir_version=9)


def test_only_a_kv_cached_decoders_logits_and_presents_get_the_decoder_budget():
    decoder = _model(
        ["input_ids", "attention_mask", "past_key_values.0.key"],
        ["logits", "present.0.key", "hidden_extra"],
    )
    assert decoder_output_tolerances(decoder) == {
        "logits": DECODER_TOLERANCE,
        "present.0.key": DECODER_TOLERANCE,
    }
    assert decoder_output_tolerances(_model(["input_ids"], ["logits"])) == {}  # no past
    assert decoder_output_tolerances(_model(["x", "past"], ["y"])) == {}  # no logits


def test_the_budget_accepts_fp32_noise_near_zero_and_rejects_a_wrong_logit():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 4, 64)) * 8).astype(np.float32)
    logits[0, 0, 0] = -0.0427  # the element that failed at atol 1e-3
    noisy = logits + rng.uniform(-1e-3, 1e-3, logits.shape).astype(np.float32)
    noisy[0, 0, 0] = -0.0438  # 1.1e-3 away
    overrides = {"logits": DECODER_TOLERANCE}
    strict = DECODER_TOLERANCE.__class__(rtol=1e-4, atol=1e-5)
    assert compare_sets([{"logits": logits}], [{"logits": noisy}], strict, overrides).passed
    wrong = logits.copy()
    wrong[1, 2, 3] += 0.05  # a bug-sized change of one logit
    assert not compare_sets([{"logits": logits}], [{"logits": wrong}], strict, overrides).passed
