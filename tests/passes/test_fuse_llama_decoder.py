"""The Llama decoder fusions on a tiny Llama exported here by optimum (the real SmolLM2
export's graph, op for op): grouped-query attention -> Attention-23 (fuse_decoder_attention),
rotate_half -> RotaryEmbedding-23 (fuse_rotary_embedding), RMSNorm -> SkipSimplifiedLN /
RMSNormalization (fuse_rms_norm), and raise_opset's decoder rule.

Each fusion: exact op counts after the pass, parity at ORT_DISABLE_ALL with the original on a
prefill, a cached decode step, a left-padded batch of 2 and a batch of 2 with a past and 2 new
tokens, a near miss left alone, and a second run that finds nothing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graph_passes.registry import create_pass
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, check, model_from_text
from models.llama import decoder_cases, export_tiny, max_diffs
from pipeline.runtime.sessions import open_session

pytestmark = pytest.mark.slow

CLEANUP = ("fold_shapes", "fold_constants", "lift_constants", "remove_noops", "collapse_chains")
TOL = 2e-5


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> ir.Model:
    return ir.load(export_tiny(tmp_path_factory.mktemp("llama")))


def _apply(name: str, model: ir.Model, target: Target) -> int:
    graph_pass = create_pass(name, target)
    graph_pass(model)
    return graph_pass.matches


@pytest.fixture(scope="module")
def cleaned(export) -> ir.Model:
    """The export raised by the decoder rule and cleaned up (what the fusions see)."""
    model = export.clone()
    assert _apply("raise_opset", model, Target("cpu")) == 1
    for name in CLEANUP:
        _apply(name, model, Target("cpu"))
    return model


def _session(model: ir.Model):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return open_session(ir.to_proto(model).SerializeToString(), options)


def assert_decoder_parity(original: ir.Model, candidate: ir.Model) -> None:
    """Same I/O (names, types, shapes) and outputs on every decoder case."""
    ref, cand = _session(original), _session(candidate)
    assert [(i.name, i.type, i.shape) for i in ref.get_inputs()] == [
        (i.name, i.type, i.shape) for i in cand.get_inputs()
    ]
    assert [(o.name, o.type, o.shape) for o in ref.get_outputs()] == [
        (o.name, o.type, o.shape) for o in cand.get_outputs()
    ]
    diffs = max_diffs(ref, cand, decoder_cases(ref))
    assert set(diffs) >= {
        "b1_prefill",
        "b1_decode",
        "b2_left_padded_prefill",
        "b2_left_padded_decode",
        "b2_left_padded_past_6_plus_2",
    }
    worst = {case: max(d.values()) for case, d in diffs.items()}
    assert max(worst.values()) < TOL, worst


def ops(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph)


# -- raise_opset's decoder rule ---------------------------------------------------------------


def test_decoder_rule_raises_grouped_query_attention_to_23(export):
    model, _ = apply_pass(create_pass("raise_opset", Target("cpu")), export)
    assert model.opset_imports[""] == 23
    again = create_pass("raise_opset", Target("cpu"))
    again(model)
    assert again.matches == 0


def test_decoder_rule_leaves_attention_without_kv_groups():
    """Near miss: a decoder attention whose K/V have as many heads as q (GPT-2) stays at its
    opset (MultiHeadAttention fuses it there)."""
    from tests.passes.test_fuse_decoder_attention import graph

    model = model_from_text(graph())
    raise_opset = create_pass("raise_opset", Target("cpu"))
    raise_opset(model)
    assert raise_opset.matches == 0 and model.opset_imports[""] == 17


def test_an_asked_opset_wins_over_the_rule(export):
    model, _ = apply_pass(create_pass("raise_opset", Target("cpu", raise_opset_to=20)), export)
    assert model.opset_imports[""] == 20


# -- fuse_decoder_attention (grouped-query) ------------------------------------------------------


def test_grouped_query_attention_becomes_attention_23(export, cleaned):
    model, _ = apply_pass(create_pass("fuse_decoder_attention", Target("cpu")), cleaned)
    counts = ops(model)
    assert counts["Attention"] == 2 and counts["Softmax"] == 0
    # the repeat_kv (Unsqueeze/Expand/Reshape x2 per layer) and the scores go; so does the
    # NaN guard: ORT's CPU Attention-23 gives 0 on fully masked rows itself
    assert counts["Expand"] == ops(cleaned)["Expand"] - 4
    assert counts["IsNaN"] == 0 and counts["MatMul"] == ops(cleaned)["MatMul"] - 4
    for node in model.graph:
        if node.op_type == "Attention":
            assert node.inputs[1].name.startswith("present.")  # KV heads, not repeated
            assert node.inputs[2].name.startswith("present.")
            assert node.attributes["scale"].as_float() == pytest.approx(0.25)
    check(model)
    assert_decoder_parity(export, model)
    again = create_pass("fuse_decoder_attention", Target("cpu"))
    again(model)
    assert again.matches == 0


def test_grouped_attention_needs_opset_23(export):
    """Below 23 (no raise) the grouped attention is blocked, never handed to MHA."""
    model = export.clone()
    for name in CLEANUP:
        _apply(name, model, Target("cpu"))
    fusion = create_pass("fuse_decoder_attention", Target("cpu"))
    fusion(model)
    assert fusion.matches == 0 and fusion.blocked == 2
    assert ops(model)["MultiHeadAttention"] == 0


def test_repeat_on_the_wrong_axis_is_left(export, cleaned):
    """Near miss: layer 0's key repeated with Unsqueeze at axis 1 (heads interleaved, not
    grouped) is not grouped-query attention; layer 1 still fuses."""
    model = cleaned.clone()
    node = next(
        n for n in model.graph if n.op_type == "Unsqueeze" and n.inputs[0].name == "present.0.key"
    )
    axes = ir.Value(name="axes_1", const_value=ir.tensor(np.array([1], np.int64)))
    model.graph.initializers.add(axes)
    node.replace_input_with(1, axes)
    fusion = create_pass("fuse_decoder_attention", Target("cpu"))
    fusion(model)
    assert fusion.matches == 1 and ops(model)["Softmax"] == 1


# -- fuse_rotary_embedding ----------------------------------------------------------------------


def test_rotate_half_becomes_rotary_embedding_23(export, cleaned):
    model, _ = apply_pass(create_pass("fuse_rotary_embedding", Target("cpu")), cleaned)
    counts, before = ops(model), ops(cleaned)
    assert counts["RotaryEmbedding"] == 4  # q and k of 2 layers
    assert counts["Neg"] == 0 and counts["Slice"] == before["Slice"] - 8
    assert counts["Cos"] == before["Cos"] + 1 and counts["Sin"] == before["Sin"] + 1
    for node in model.graph:
        if node.op_type == "RotaryEmbedding":
            assert len(node.inputs) == 3  # per-batch caches, no position table
            assert node.inputs[1].shape is not None and len(node.inputs[1].shape) == 3
    check(model)
    assert_decoder_parity(export, model)
    again = create_pass("fuse_rotary_embedding", Target("cpu"))
    again(model)
    assert again.matches == 0


def test_rotation_the_other_way_is_left(export, cleaned):
    """Near miss: Concat(x1, Neg(x2)) (the inverse rotation's layout) is not rotate_half."""
    model = cleaned.clone()
    concat = next(
        n
        for n in model.graph
        if n.op_type == "Concat"
        and n.inputs
        and (p := n.inputs[0].producer())
        and p.op_type == "Neg"
    )
    a, b = concat.inputs
    concat.replace_input_with(0, b)
    concat.replace_input_with(1, a)
    fusion = create_pass("fuse_rotary_embedding", Target("cpu"))
    fusion(model)
    assert fusion.matches == 3


def test_rotary_needs_opset_23(export):
    model = export.clone()
    for name in CLEANUP:
        _apply(name, model, Target("cpu"))
    fusion = create_pass("fuse_rotary_embedding", Target("cpu"))
    fusion(model)
    assert fusion.matches == 0 and fusion.blocked == 4


def test_the_nan_guard_stays_only_where_the_kernel_may_give_nan(export, cleaned):
    """SDPA zeroes the probabilities of a query row whose every key is masked (a left pad's
    row). ORT's CPU Attention-23 returns 0 there itself (probed), so a ``cpu`` target drops
    the guard and still matches the export on every position, padded rows and their cache
    slots included; a ``cuda`` target, whose kernel is not probed, keeps it."""
    assert Target("cpu").zeroes_fully_masked_attention
    cuda, _ = apply_pass(create_pass("fuse_decoder_attention", Target("cuda")), cleaned)
    assert ops(cuda)["Attention"] == 2 and ops(cuda)["IsNaN"] == 2
    cpu, _ = apply_pass(create_pass("fuse_decoder_attention", Target("cpu")), cleaned)
    assert ops(cpu)["IsNaN"] == 0
    ref, cand = _session(export), _session(cpu)
    feeds = decoder_cases(ref)["b2_left_padded_prefill"]
    assert not feeds["attention_mask"].all()  # there are padded rows to get wrong
    for want, got in zip(ref.run(None, feeds), cand.run(None, feeds), strict=True):
        assert np.isfinite(want).all() and np.isfinite(got).all()
        assert np.abs(want - got).max() < TOL


# -- fuse_attention_cache -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused(cleaned) -> ir.Model:
    """Rotary and attention fused: the 4D Attention-23 that fuse_attention_cache rewrites."""
    model = cleaned.clone()
    for name in ("fuse_rotary_embedding", "fuse_decoder_attention"):
        assert _apply(name, model, Target("cpu")) > 0
    return model


def test_attention_takes_its_cache_and_3d_projections(export, fused):
    model = fused.clone()
    assert _apply("fuse_attention_cache", model, Target("cpu")) == 2
    _apply("remove_dead", model, Target("cpu"))
    counts, before = ops(model), ops(fused)
    assert counts["Attention"] == 2 and counts["RotaryEmbedding"] == 4
    # per layer: the q/k/v head splits and the merge (4 Transpose + 4 Reshape), the two
    # cache Concats
    assert counts["Transpose"] == before["Transpose"] - 8
    assert counts["Reshape"] == before["Reshape"] - 8
    for node in model.graph:
        if node.op_type == "Attention":
            assert [v.name for v in node.outputs[1:]] in (
                ["present.0.key", "present.0.value"],
                ["present.1.key", "present.1.value"],
            )
            assert node.inputs[4].name.startswith("past_key_values.")
            assert node.attributes["q_num_heads"].as_int() == 4
            assert node.attributes["kv_num_heads"].as_int() == 2
        if node.op_type == "RotaryEmbedding":
            assert node.attributes["num_heads"].as_int() in (4, 2)
            assert len(node.inputs[0].shape) == 3
    check(model)
    assert_decoder_parity(export, model)
    again = create_pass("fuse_attention_cache", Target("cpu"))
    again(model)
    assert again.matches == 0


def test_a_present_read_by_another_op_keeps_the_cache_outside(fused):
    """Near miss: layer 0's present key also feeds a Mul; its Concat must stay (the fused op
    would hand the Mul a tensor the Mul helped to compute)."""
    model = fused.clone()
    present = next(v for v in model.graph.outputs if v.name == "present.0.key")
    extra = ir.Node("", "Mul", [present, present])
    model.graph.append(extra)
    extra.outputs[0].name = "extra"
    model.graph.outputs.append(extra.outputs[0])
    fusion = create_pass("fuse_attention_cache", Target("cpu"))
    fusion(model)
    assert fusion.matches == 1
    assert any("present.0.key is read by Mul" in r for r in fusion.rejected)


def test_projections_are_packed_per_shared_input(export, fused):
    """After the attention fusions, q/k/v and gate/up of each layer become one MatMul each."""
    model = fused.clone()
    assert _apply("fuse_attention_cache", model, Target("cpu")) == 2
    before = ops(model)
    assert _apply("fuse_packed_matmuls", model, Target("cpu")) == 4  # 2 layers x (qkv, gate/up)
    counts = ops(model)
    assert counts["Split"] == before["Split"] + 4
    assert counts["MatMul"] == before["MatMul"] - 2 * 3 + 2 * 1 - 2 * 2 + 2 * 1
    check(model)
    assert_decoder_parity(export, model)


# -- fuse_rms_norm on the Llama graph (regression) ----------------------------------------------


def test_llama_rms_norms(export, cleaned):
    model, _ = apply_pass(create_pass("fuse_rms_norm", Target("cpu")), cleaned)
    counts = ops(model)
    # input/post-attention norms after a residual Add and the final norm: Skip; the first
    # input norm (embedding Gather, no residual): RMSNormalization at opset 23
    assert counts["SkipSimplifiedLayerNormalization"] == 4
    assert counts["RMSNormalization"] == 1
    assert counts["Pow"] == counts["ReduceMean"] == counts["Sqrt"] == 0
    check(model)
    assert_decoder_parity(export, model)
    again = create_pass("fuse_rms_norm", Target("cpu"))
    again(model)
    assert again.matches == 0


def test_every_llama_fusion_together(export, cleaned):
    """The default order (rotary, attention, norms, SiLU): the fused ops compose exactly."""
    model = cleaned.clone()
    fusions = ("fuse_rotary_embedding", "fuse_decoder_attention", "fuse_attention_cache")
    for name in (*fusions, "fuse_rms_norm", "fuse_silu"):
        assert _apply(name, model, Target("cpu")) > 0
    for name in ("remove_dead", "eliminate_common_subexpressions", "remove_dead"):
        _apply(name, model, Target("cpu"))
    counts = ops(model)
    assert {
        op: counts[op]
        for op in ("Attention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization", "Softmax")
    } == {"Attention": 2, "RotaryEmbedding": 4, "SkipSimplifiedLayerNormalization": 4, "Softmax": 0}
    check(model)
    assert_decoder_parity(export, model)


def test_fusion_report_rows_for_llama(export, cleaned):
    """The decoder family's report sees the export's RMSNorms through their no-op Casts."""
    from pipeline.fusion_report import expected_fusions

    model = cleaned.clone()
    for name in ("fuse_rotary_embedding", "fuse_decoder_attention", "fuse_rms_norm"):
        _apply(name, model, Target("cpu"))
    rows = {row.fusion: (row.expected, row.achieved) for row in expected_fusions(export, model)}
    assert rows["attention"] == (2, 2)
    assert rows["rmsnorm"] == (5, 5)
