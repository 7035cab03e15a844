"""share_shape_reads: Shape nodes over values with the same symbolic dims read one Shape (the
common subexpression pass then merges what follows); different, unknown or overridable dims
are left; on a tiny Llama export the per-layer mask chains become one."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import pytest

from graph_passes.cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressions
from graph_passes.cleanup.remove_dead import RemoveDead
from graph_passes.cleanup.share_shape_reads import ShareShapeReads
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
WEIGHTS = (
    "<float[8, 4] w1 = {"
    + ",".join(["0.5"] * 32)
    + "}, float[8, 4] w2 = {"
    + ",".join(["-1.0"] * 32)
    + "}, int64 one = {1}, int64[1] zero = {0}, int64[1] axis = {1}>"
)


def chains(first: str, second: str, shapes: str = "Shape(a)", shapes2: str = "Shape(b)") -> str:
    """Two projections of inputs ``first``/``second``, each followed by Shape -> Gather(1) ->
    Unsqueeze -> Slice of a mask: what an exporter repeats per layer."""
    return (
        HEADER
        + f"""
g ({first} x, {second} z, float[N, T] mask) => (float[N, T] y) {WEIGHTS} {{
  a = MatMul(x, w1)
  b = MatMul(z, w2)
  sa = {shapes}
  sb = {shapes2}
  la = Gather(sa, one)
  lb = Gather(sb, one)
  ua = Unsqueeze(la, zero)
  ub = Unsqueeze(lb, zero)
  ma = Slice(mask, zero, ua, axis)
  mb = Slice(mask, zero, ub, axis)
  y = Add(ma, mb)
}}
"""
    )


def share(model: ir.Model) -> tuple[ir.Model, int]:
    pass_ = ShareShapeReads()
    candidate, _ = apply_pass(pass_, model)
    candidate, _ = apply_pass(EliminateCommonSubexpressions(), candidate)
    candidate, _ = apply_pass(RemoveDead(), candidate)
    return candidate, pass_.matches


def counts(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph)


def test_same_symbolic_dims_share_one_shape_and_the_chains_merge():
    model = model_from_text(chains("float[N, S, 8]", "float[N, S, 8]"))
    candidate, matches = share(model)
    assert matches == 1
    assert counts(candidate) == {
        "MatMul": 1,
        "Shape": 1,
        "Gather": 1,
        "Unsqueeze": 1,
        "Slice": 1,
        "Add": 1,
    }
    check(candidate)
    assert_parity(model, candidate)
    again = ShareShapeReads()
    apply_pass(again, candidate)
    assert again.matches == 0


def test_start_and_end_compare_only_the_dims_read():
    """``Shape(x, 0, 2)`` of [N, S, 8] and of [N, S, 4] read the same two dims."""
    text = chains(
        "float[N, S, 8]", "float[N, S, 8]", "Shape<start = 0, end = 2>(a)", "Shape<end = -1>(x)"
    )
    candidate, matches = share(model_from_text(text))
    assert matches == 1 and counts(candidate)["Shape"] == 1


@pytest.mark.parametrize(
    "second",
    [
        "float[N, T, 8]",  # another symbol: may differ at run time
        "float[N, 3, 8]",  # a fixed length against a symbol
        "float[N, ?, 8]",  # unknown
    ],
)
def test_dims_not_proven_equal_are_left(second):
    model = model_from_text(chains("float[N, S, 8]", second))
    candidate, matches = share(model)
    assert matches == 0 and counts(candidate)["Shape"] == 2


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """One tiny Llama export (optimum, the real SmolLM2 export's graph) for this module."""
    from models.llama import export_tiny

    return export_tiny(tmp_path_factory.mktemp("llama"))


def test_a_llama_export_cuts_its_mask_once(llama_path):
    """optimum's Llama export slices the causal mask to the key length in every layer; after
    the pass and CSE one chain is left, with the decoder outputs unchanged on prefill, cached,
    left-padded and past+new cases."""
    from tests.passes.test_fuse_llama_decoder import assert_decoder_parity

    export = ir.load(llama_path)
    before = counts(export)
    candidate, matches = share(export)
    after = counts(candidate)
    layers = sum(1 for v in export.graph.outputs if v.name.endswith(".key"))
    assert layers == 2 and matches >= layers - 1
    assert after["Slice"] < before["Slice"] and after["Shape"] < before["Shape"]
    check(candidate)
    assert_decoder_parity(export, candidate)


def test_two_unknown_dims_are_not_the_same_dim():
    text = chains("float[N, ?, 8]", "float[N, ?, 8]", "Shape(x)", "Shape(z)")
    candidate, matches = share(model_from_text(text))
    assert matches == 0 and counts(candidate)["Shape"] == 2


def test_it_waits_until_the_fusions_are_done(llama_path):
    """Shared chains hide each layer's head-split shape arithmetic from the attention cache
    fusion (on SmolLM2 its rotary fusion only matched in a later iteration, after the sharing,
    and all 30 KV cache Concats stayed outside): so the pass manager runs it only once the
    other passes stop changing the model."""
    from graph_passes.registry import create_pass
    from graph_passes.target.targets import Target

    model = ir.load(llama_path)

    def apply(name: str) -> int:
        graph_pass = create_pass(name, Target("cpu"))
        graph_pass(model)
        return graph_pass.matches

    cleanup = ("fold_shapes", "fold_constants", "lift_constants", "remove_noops", "collapse_chains")
    for name in ("raise_opset", *cleanup):
        apply(name)
    assert apply("fuse_decoder_attention") == 2
    assert apply("share_shape_reads") > 0 and apply("eliminate_common_subexpressions") > 0
    assert apply("fuse_rotary_embedding") == 4
    assert apply("fuse_attention_cache") == 0  # the hazard
    assert ShareShapeReads.after_fixed_point
