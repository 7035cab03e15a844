"""fuse_decoder_attention: decoder attention over a KV cache becomes one MultiHeadAttention
(exact op list, attributes, parity on masks with fully masked rows, holes and past lengths 0
and > 0), and near misses are left exactly as they were."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graph_passes.fusions.decoder_attention import FuseDecoderAttention
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, assert_parity, model_from_text, op_list

HEADS, HEAD_DIM = 2, 8
HIDDEN = HEADS * HEAD_DIM
TOL = {"rtol": 1e-5, "atol": 1e-5}
SQRT_SCALE = float(np.float32(HEAD_DIM**-0.25))  # SDPA's export scales q and k by sqrt(scale)

LINES = {  # name -> line of one decoder attention (SDPA export form); tests swap lines
    "split": "q3, k3, v3 = Split<axis = 2>(qkv, sizes)",
    "qr": "qr = Reshape(q3, heads)",
    "q4": "q4 = Transpose<perm = [0, 2, 1, 3]>(qr)",
    "kr": "kr = Reshape(k3, heads)",
    "k4": "k4 = Transpose<perm = [0, 2, 1, 3]>(kr)",
    "vr": "vr = Reshape(v3, heads)",
    "v4": "v4 = Transpose<perm = [0, 2, 1, 3]>(vr)",
    "pk": "present_k = Concat<axis = -2>(past_k, k4)",
    "pv": "present_v = Concat<axis = -2>(past_v, v4)",
    "bias": "bias = Where(mask, zero, neg_inf)",
    "kt": "kt = Transpose<perm = [0, 1, 3, 2]>(present_k)",
    "qs": "qs = Mul(q4, c)",
    "ks": "ks = Mul(kt, c)",
    "s": "s = MatMul(qs, ks)",
    "sb": "sb = Add(s, bias)",
    "p": "p = Softmax<axis = -1>(sb)",
    "nan": "nan = IsNaN(p)",
    "pg": "pg = Where(nan, zero, p)",
    "a": "a = MatMul(pg, present_v)",
    "at": "at = Transpose<perm = [0, 2, 1, 3]>(a)",
    "y": "y = Reshape(at, merged)",
    "post": "out = Neg(y)",
}
# Op list after the fusion of the base graph: the cache Concats and the mask stay.
FUSED = [
    "Split",
    "Reshape",
    "Transpose",
    "Reshape",
    "Transpose",
    "Concat",
    "Concat",
    "Where",
    "MultiHeadAttention",
    "IsNaN",
    "Where",
    "Neg",
]


def graph(extra_in: str = "", extra_out: str = "", kv_heads: int = HEADS, **lines) -> str:
    body = "\n  ".join(line for line in {**LINES, **lines}.values() if line)
    kv = f"[B, {kv_heads}, P, {HEAD_DIM}]"
    present = f"[B, {kv_heads}, T, {HEAD_DIM}]"
    return f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, {HIDDEN + 2 * kv_heads * HEAD_DIM}] qkv, float{kv} past_k, float{kv} past_v,
   bool[B, 1, S, T] mask{extra_in})
  => (float[B, S, {HIDDEN}] out, float{present} present_k, float{present} present_v{extra_out})
<int64[3] sizes = {{{HIDDEN}, {kv_heads * HEAD_DIM}, {kv_heads * HEAD_DIM}}},
 int64[4] heads = {{0, 0, -1, {HEAD_DIM}}}, int64[3] merged = {{0, 0, -1}},
 float c = {{{SQRT_SCALE!r}}}, float[1] zero = {{0.0}}, float[1] neg_inf = {{-inf}},
 float d = {{{HEAD_DIM**0.5!r}}}> {{
  {body}
}}"""


def mask_rows(batch: int, seq: int, past: int) -> np.ndarray:
    """Causal ``bool[B, 1, S, P + S]`` mask from padding rows cycling left (so that query rows
    see nothing at all when ``past`` is 0), holes, right padding and none."""
    total = past + seq
    padding = np.ones((batch, total), dtype=bool)
    for row in range(batch):
        kind = row % 4
        if kind == 0:
            padding[row, : past + 2] = False
        elif kind == 1:
            padding[row, 1::3] = False
        elif kind == 2:
            padding[row, total - max(1, total // 3) :] = False
    causal = np.arange(total)[None, :] <= (past + np.arange(seq))[:, None]
    return (causal[None, None] & padding[:, None, None, :]).copy()


def feeds(kv_heads: int = HEADS, extra=None) -> list[dict[str, np.ndarray]]:
    """Past lengths 0 and > 0, batch 2 and 3, a decode step of one token."""
    rng = np.random.default_rng(0)
    sets = []
    for batch, seq, past in ((2, 5, 0), (3, 4, 6), (4, 1, 7)):
        kv = (batch, kv_heads, past, HEAD_DIM)
        width = HIDDEN + 2 * kv_heads * HEAD_DIM
        feed = {
            "qkv": rng.standard_normal((batch, seq, width)).astype(np.float32),
            "past_k": rng.standard_normal(kv).astype(np.float32),
            "past_v": rng.standard_normal(kv).astype(np.float32),
            "mask": mask_rows(batch, seq, past),
        }
        sets.append({**feed, **(extra(batch, seq, past) if extra else {})})
    return sets


def run(text: str, sets=None, target: Target | None = None):
    model = model_from_text(text)
    pass_ = FuseDecoderAttention(target)
    candidate, result = apply_pass(pass_, model)
    assert result.modified == (pass_.matches > 0)
    proto = ir.to_proto(candidate)
    # full_check runs strict shape inference, which has no schema for com.microsoft ops;
    # the plain checker still validates the graph's structure and the standard nodes.
    onnx.checker.check_model(proto, full_check=not pass_.matches)
    assert_parity(model, candidate, sets if sets is not None else feeds(), **TOL)
    assert not FuseDecoderAttention(target)(candidate.clone()).modified, "second run: nothing"
    return model, candidate, pass_


def attention(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    return node


def test_sdpa_export_form_is_fused():
    _, out, pass_ = run(graph())
    assert pass_.matches == 1 and op_list(out) == FUSED
    node = attention(out)
    assert node.domain == "com.microsoft"
    assert [v.name if v else "" for v in node.inputs] == [
        "q3",
        "present_k",
        "present_v",
        "",
        "",
        "bias",
    ]
    assert node.attributes.get_int("num_heads") == HEADS
    assert node.attributes.get_float("scale") == pytest.approx(HEAD_DIM**-0.5, rel=1e-6)
    assert out.opset_imports["com.microsoft"] == 1
    # The scale constant went with the Muls; the guard's 0 is still read.
    assert "c" not in out.graph.initializers and "zero" in out.graph.initializers
    # The cache outputs keep their producers (the Concats), names and declared shapes.
    names = [v.name for v in out.graph.outputs]
    assert names == ["out", "present_k", "present_v"]
    for value in out.graph.outputs[1:]:
        assert value.producer().op_type == "Concat"
        assert [str(d) for d in value.shape] == ["B", "2", "T", "8"]


def test_feeds_have_fully_masked_rows_that_the_guard_zeroes():
    """Without the output guard the fused op's NaN rows would leak: the feeds must show it."""
    _, out, _ = run(graph())
    guard = [n for n in out.graph if n.op_type == "Where" and n.inputs[0].producer()]
    guard = [n for n in guard if n.inputs[0].producer().op_type == "IsNaN"]
    assert len(guard) == 1
    unguarded = out.clone()
    (where,) = [n for n in unguarded.graph if n.name == guard[0].name]
    where.replace_input_with(1, where.inputs[2])  # Where(nan, o, o): guard off
    from pipeline.runtime import sessions as runners

    session = runners.create_session(unguarded, optimization="disable_all")
    assert np.isnan(session.run(feeds()[0])["out"]).any()


FIRE = {  # name: (graph text, expected op list)
    "eager_scores_divided_no_guard": (
        graph(
            qs="",
            ks="",
            s="s0 = MatMul(q4, kt)\n  s = Div(s0, d)",
            nan="",
            pg="",
            a="a = MatMul(p, present_v)",
            bias="bias = Where(mask, zero, lowest)",
        ).replace("float d =", "float lowest = {-3.4028234663852886e+38}, float d ="),
        [*FUSED[:9], "Neg"],
    ),
    "scale_on_q_only_swapped_add": (
        graph(qs="qs = Mul(q4, c2)", ks="", s="s = MatMul(qs, kt)", sb="sb = Add(bias, s)").replace(
            "float d =", f"float c2 = {{{HEAD_DIM**-0.5!r}}}, float d ="
        ),
        FUSED,
    ),
    "no_cache": (
        graph(
            pk="",
            pv="",
            kt="kt = Transpose<perm = [0, 1, 3, 2]>(k4)",
            a="a = MatMul(pg, v4)",
            post="out = Neg(y)\n  present_k = Identity(k4)\n  present_v = Identity(v4)",
        ),
        [*FUSED[:5], *FUSED[7:-1], "Neg", "Identity", "Identity"],
    ),
    "constant_head_shapes_and_output": (
        graph(post="", y="out = Reshape(at, merged)")
        .replace("int64[3] merged = {0, 0, -1}", f"int64[3] merged = {{0, 0, {HIDDEN}}}")
        .replace(f"{{0, 0, -1, {HEAD_DIM}}}", f"{{0, 0, {HEADS}, {HEAD_DIM}}}"),
        FUSED[:-1],
    ),
}


@pytest.mark.parametrize(("text", "ops"), FIRE.values(), ids=FIRE.keys())
def test_variants_are_fused(text, ops):
    sets = None
    if "present_k = Identity" in text:  # no past: feeds without a cache
        sets = [{k: v for k, v in f.items()} for f in feeds() if f["past_k"].shape[2] == 0]
    _, out, pass_ = run(text, sets)
    assert pass_.matches == 1 and op_list(out) == ops
    assert attention(out).attributes.get_float("scale") == pytest.approx(HEAD_DIM**-0.5, 1e-6)


def test_graph_output_keeps_its_name():
    _, out, _ = run(graph(post="", y="out = Reshape(at, merged)"))
    assert out.graph.outputs[0].name == "out"
    assert out.graph.outputs[0].producer().op_type == "Where"


def test_shape_computed_head_split_is_fused_and_its_shape_math_removed():
    """The exporters' ``Concat(Unsqueeze(Gather(Shape(x), i)), ..)`` shapes, as in GPT-2."""
    dynamic = {
        "qr": "qs0 = Shape(q3)\n  qb = Gather<axis = 0>(qs0, i0)\n  qn = Gather<axis = 0>(qs0, i1)"
        "\n  qbu = Unsqueeze(qb, ax0)\n  qnu = Unsqueeze(qn, ax0)"
        "\n  qshape = Concat<axis = 0>(qbu, qnu, m1, hd)\n  qr = Reshape(q3, qshape)",
        "y": "ts = Shape(at)\n  tb = Gather<axis = 0>(ts, i0)\n  tn = Gather<axis = 0>(ts, i1)"
        "\n  tbu = Unsqueeze(tb, ax0)\n  tnu = Unsqueeze(tn, ax0)"
        "\n  tshape = Concat<axis = 0>(tbu, tnu, m1)\n  y = Reshape(at, tshape)",
    }
    text = graph(**dynamic).replace(
        "float d =",
        "int64 i0 = {0}, int64 i1 = {1}, int64[1] ax0 = {0}, int64[1] m1 = {-1}, "
        f"int64[1] hd = {{{HEAD_DIM}}}, float d =",
    )
    _, out, pass_ = run(text)
    assert pass_.matches == 1
    # q's shape math goes with q's split; nothing reads Shape(at) any more.
    assert op_list(out) == FUSED


KEEP = {
    "scale_not_constant": graph(
        extra_in=", float cin", qs="qs = Mul(q4, cin)", ks="ks = Mul(kt, cin)"
    ),
    "softmax_not_last_axis": graph(p="p = Softmax<axis = 2>(sb)"),
    "probs_used_elsewhere": graph(extra_out=", float[B, 2, S, T] p"),
    "scores_used_elsewhere": graph(
        post="y2 = Neg(y)\n  sm = ReduceMax<keepdims = 0>(s)\n  out = Add(y2, sm)"
    ),
    "q_heads_used_elsewhere": graph(
        post="y2 = Neg(y)\n  qsum = ReduceSum<keepdims = 0>(q4)\n  out = Add(y2, qsum)"
    ),
    "select_mask_instead_of_add": graph(bias="", sb="sb = Where(mask, s, neg_inf)"),
    # (B, S, D, H) merged: heads interleaved, another layout than MultiHeadAttention's
    "merge_transpose_not_to_heads": graph(at="at = Transpose<perm = [0, 2, 3, 1]>(a)"),
    "bias_broadcast_over_query": graph(
        extra_in=", float[B, 1, 1, T] pad", bias="", sb="sb = Add(s, pad)"
    ),
}


def keep_extra(name):
    if name == "scale_not_constant":
        return lambda b, s, p: {"cin": np.array(SQRT_SCALE, np.float32)}
    if name == "bias_broadcast_over_query":
        return lambda b, s, p: {
            "pad": np.where(mask_rows(b, s, p)[:, :, -1:, :], 0, -1e4).astype(np.float32)
        }
    return None


WHY = {  # near miss -> the reason it is rejected (None: not even attention-shaped)
    "scale_not_constant": "scaled by a non-constant",
    "softmax_not_last_axis": "Softmax is not over the last axis",
    "probs_used_elsewhere": "intermediate p is used outside",
    "scores_used_elsewhere": "intermediate s is used outside",
    "q_heads_used_elsewhere": "intermediate q4 is used outside",
    "select_mask_instead_of_add": None,
    "merge_transpose_not_to_heads": "not Transpose<0,2,1,3> then Reshape",
    "bias_broadcast_over_query": "bias broadcasts over the query length",
}


@pytest.mark.parametrize("name", KEEP.keys())
def test_near_miss_is_kept(name):
    text = KEEP[name]
    model, out, pass_ = run(text, feeds(extra=keep_extra(name)))
    assert pass_.matches == 0 and pass_.blocked == 0
    assert op_list(out) == op_list(model)
    if WHY[name] is None:
        assert pass_.rejected == []
    else:
        assert len(pass_.rejected) == 1 and WHY[name] in pass_.rejected[0]


def test_shared_kv_head_is_kept():
    """One key/value head broadcast over two query heads (MatMul broadcasting) is valid ONNX
    but not MultiHeadAttention's layout: rejected with the reason."""
    model, out, pass_ = run(graph(kv_heads=1), feeds(kv_heads=1))
    assert pass_.matches == 0 and op_list(out) == op_list(model)
    assert any("key is not (B, 2, T, 8)" in r for r in pass_.rejected)


def test_portable_target_blocks():
    model, out, pass_ = run(graph(), target=Target("portable"))
    assert pass_.matches == 0 and pass_.blocked == 1
    assert op_list(out) == op_list(model)


def test_classifier_softmax_is_not_attention():
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) <float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3}> {
  z = MatMul(x, w)
  y = Softmax<axis = -1>(z)
}"""
    model, out, pass_ = run(text, [{"x": np.ones((2, 4), np.float32)}])
    assert pass_.matches == 0 and pass_.rejected == [] and op_list(out) == op_list(model)


def test_portable_target_at_opset_23_gets_standard_attention():
    text = graph().replace(
        '<ir_version: 8, opset_import: ["" : 17]>', '<ir_version: 10, opset_import: ["" : 23]>'
    )
    model = model_from_text(text)
    pass_ = FuseDecoderAttention(Target("portable"))
    out, result = apply_pass(pass_, model)
    assert result.modified and pass_.matches == 1 and pass_.blocked == 0
    split = ["Reshape", "Transpose"]  # q's, k's and v's head split all stay
    assert op_list(out) == [
        "Split",
        *split * 3,
        "Concat",
        "Concat",
        "Where",
        "Attention",
        "IsNaN",
        "Where",
        "Transpose",
        "Reshape",
        "Neg",
    ]
    assert all(n.domain in ("", "ai.onnx") for n in out.graph)
    assert "com.microsoft" not in out.opset_imports
    (node,) = [n for n in out.graph if n.op_type == "Attention"]
    assert [v.name for v in node.inputs] == ["q4", "present_k", "present_v", "bias"]
    assert node.attributes.get_float("scale") == pytest.approx(HEAD_DIM**-0.5, rel=1e-6)
    onnx.checker.check_model(ir.to_proto(out), full_check=True)  # standard ops only
    assert_parity(model, out, feeds(), **TOL)
