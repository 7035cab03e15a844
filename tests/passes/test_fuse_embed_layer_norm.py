"""fuse_embed_layer_norm: word + position [+ segment] lookups summed and normalized become one
EmbedLayerNormalization, only when the position ids are provably 0..S-1 and every lookup
table is a constant; shared partial sums, arbitrary position ids and portable are left."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graph_passes.fusions.embed_layer_norm import FuseEmbedLayerNorm
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, assert_parity, model_from_text, op_list

TOL = {"rtol": 1e-5, "atol": 1e-5}
VOCAB, MAX_POS, HIDDEN = 11, 8, 4


def _floats(shape: tuple[int, ...], seed: int) -> str:
    values = np.random.default_rng(seed).standard_normal(shape).round(3).reshape(-1)
    return ", ".join(f"{v:.3f}" for v in values)


INITS = (
    f"float[{VOCAB}, {HIDDEN}] word = {{{_floats((VOCAB, HIDDEN), 1)}}},\n"
    f" float[{MAX_POS}, {HIDDEN}] pos = {{{_floats((MAX_POS, HIDDEN), 2)}}},\n"
    f" float[2, {HIDDEN}] type = {{{_floats((2, HIDDEN), 3)}}},\n"
    " float[4] gamma = {0.5, -1.0, 2.0, 1.5}, float[4] beta = {0.1, 0.2, -0.3, 0.0},\n"
    " int64[1, 8] pos_ids = {0, 1, 2, 3, 4, 5, 6, 7},\n"
    " int64[1, 8] pos_ids_shifted = {1, 2, 3, 4, 5, 6, 7, 7},\n"
    " int64[1] zero = {0}, int64[1] one = {1}, int64 one_s = {1}, int64 zero_s = {0}"
)
LINES = {
    "sh": "sh = Shape(ids)",
    "n": "n = Gather<axis = 0>(sh, one_s)",
    "end": "end = Unsqueeze(n, zero)",
    "pid": "pid = Slice(pos_ids, zero, end, one, one)",
    "w": "w = Gather(word, ids)",
    "t": "t = Gather(type, seg)",
    "a": "a = Add(w, t)",
    "p": "p = Gather(pos, pid)",
    "s": "s = Add(a, p)",
    "ln": "z = LayerNormalization<axis = -1, epsilon = 0.001>(s, gamma, beta)",
    "post": "out = Neg(z)",
}


def graph(extra_in="", extra_out="", domains="", id_type="int64", inits=INITS, **lines):
    body = "\n  ".join(line for line in {**LINES, **lines}.values() if line)
    return f"""<ir_version: 8, opset_import: ["" : 17{domains}]>
g ({id_type}[B, S] ids, {id_type}[B, S] seg{extra_in}) => (float[B, S, 4] out{extra_out})
<{inits}> {{
  {body}
}}"""


def feeds(id_type=np.int64, extra=None):
    """Batches with right and left padding (id 0 in padded places), S from 1 to MAX_POS."""
    rng = np.random.default_rng(0)
    sets = []
    for batch, seq in ((1, 1), (2, 5), (3, MAX_POS)):
        ids = rng.integers(1, VOCAB, (batch, seq))
        seg = rng.integers(0, 2, (batch, seq))
        if batch > 1:
            ids[0, seq // 2 :] = 0  # right padding
            ids[1, : seq // 2] = 0  # left padding
        feed = {"ids": ids.astype(id_type), "seg": seg.astype(id_type)}
        for name, make in (extra or {}).items():
            feed[name] = make(batch, seq)
        sets.append(feed)
    return sets


def run(text: str, target: Target | None = None, sets=None):
    model = model_from_text(text)
    pass_ = FuseEmbedLayerNorm(target)
    candidate, result = apply_pass(pass_, model)
    assert result.modified == (pass_.matches > 0)
    proto = ir.to_proto(candidate)
    if pass_.matches:
        # com.microsoft nodes: the full check cannot know the contrib schema.
        onnx.checker.check_model(proto)
    else:
        onnx.checker.check_model(proto, full_check=True)
    assert_parity(model, candidate, sets if sets is not None else feeds(), **TOL)
    assert not FuseEmbedLayerNorm(target)(candidate.clone()).modified, "second run: nothing"
    return model, candidate, pass_


def eln(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "EmbedLayerNormalization"]
    assert node.domain == "com.microsoft"
    return node


def names(node: ir.Node) -> list[str]:
    return ["" if v is None else v.name for v in node.inputs]


def test_word_position_segment_slice_of_buffer():
    _, out, pass_ = run(graph())
    assert pass_.matches == 1
    assert op_list(out) == ["Cast", "Cast", "EmbedLayerNormalization", "Neg"]
    node = eln(out)
    assert names(node)[2:] == ["word", "pos", "type", "gamma", "beta"]
    assert [v.producer().inputs[0].name for v in node.inputs[:2]] == ["ids", "seg"]
    assert node.attributes.get_float("epsilon") == pytest.approx(0.001)
    assert len(node.outputs) == 2 and not node.outputs[1].uses()  # mask_index unused
    assert node.outputs[0].name == "z"


def test_sequence_length_from_shape_slice_of_other_ids():
    # torch-dynamo's form: Shape<start=1, end=2>(token_type_ids), same [B, S] as input_ids.
    _, out, _ = run(graph(sh="end = Shape<start = 1, end = 2>(seg)", n="", end=""))
    assert op_list(out) == ["Cast", "Cast", "EmbedLayerNormalization", "Neg"]


def test_sum_in_other_order_and_position_as_range():
    lines = {
        "sh": "sh = Shape(ids)",
        "n": "n = Gather<axis = 0>(sh, one_s)",
        "end": "r = Range(zero_s, n, one_s)",
        "pid": "pid = Unsqueeze(r, zero)",
        "a": "a = Add(p, w)",
        "p": "p = Gather(pos, pid)",
        "s": "s = Add(t, a)",
    }
    _, out, _ = run(
        graph(**{**lines, "p": "", "a": ""}).replace(
            "t = Gather(type, seg)",
            "t = Gather(type, seg)\n  p = Gather(pos, pid)\n  a = Add(p, w)",
        )
    )
    assert op_list(out) == ["Cast", "Cast", "EmbedLayerNormalization", "Neg"]
    assert names(eln(out))[2:5] == ["word", "pos", "type"]


def test_no_segment_and_int32_ids_need_no_cast():
    text = graph(id_type="int32", t="", a="", s="s = Add(w, p)")
    _, out, _ = run(text, sets=feeds(np.int32))
    assert op_list(out) == ["EmbedLayerNormalization", "Neg"]
    assert names(eln(out)) == ["ids", "", "word", "pos", "", "gamma", "beta"]


def test_already_skip_layer_norm():
    text = graph(
        domains=', "com.microsoft" : 1',
        s="",
        ln="z = com.microsoft.SkipLayerNormalization<epsilon = 0.001>(a, p, gamma, beta)",
    )
    _, out, _ = run(text)
    assert op_list(out) == ["Cast", "Cast", "EmbedLayerNormalization", "Neg"]


def test_sum_used_elsewhere_comes_from_third_output():
    _, out, pass_ = run(graph(post="o1 = Neg(z)\n  out = Add(o1, s)"))
    assert pass_.matches == 1
    assert op_list(out) == ["Cast", "Cast", "EmbedLayerNormalization", "Neg", "Add"]
    node = eln(out)
    assert len(node.outputs) == 3 and node.outputs[2].name == "s"
    assert [u.node.op_type for u in node.outputs[2].uses()] == ["Add"]


def test_attention_mask_is_left_to_the_graph():
    # The mask is not given to the fused node (mask_index stays unused): the graph's own use of
    # it is kept and the holes in the mask change nothing in the fused part.
    def mask(batch, seq):
        rows = np.ones((batch, seq), np.int64)
        rows[:, ::2] = 0
        return rows

    text = graph(
        extra_in=", int64[B, S] mask",
        post="mf = Cast<to = 1>(mask)\n  m3 = Unsqueeze(mf, m1)\n  out = Mul(z, m3)",
    ).replace("int64 zero_s = {0}", "int64 zero_s = {0}, int64[1] m1 = {-1}")
    _, out, _ = run(text, sets=feeds(extra={"mask": mask}))
    assert op_list(out) == ["Cast", "Cast", "EmbedLayerNormalization", "Cast", "Unsqueeze", "Mul"]
    assert len(eln(out).inputs) == 7


KEEP = {
    "word_table_is_an_input": graph(
        extra_in=f", float[{VOCAB}, 4] word_in", w="w = Gather(word_in, ids)"
    ),
    "position_ids_from_an_input": graph(
        extra_in=", int64[1, S] pid_in", p="p = Gather(pos, pid_in)"
    ),
    "position_buffer_not_arange": graph(pid="pid = Slice(pos_ids_shifted, zero, end, one, one)"),
    "partial_sum_shared": graph(post="o1 = Neg(z)\n  out = Add(o1, a)"),
    "lookup_shared": graph(post="o1 = Neg(z)\n  out = Add(o1, w)"),
    "layer_norm_mean_output_used": graph(
        ln="z, mu = LayerNormalization<axis = -1, epsilon = 0.001>(s, gamma, beta)",
        post="o1 = Neg(z)\n  out = Add(o1, mu)",
    ),
    "no_position_lookup": graph(p="p = Gather(type, seg)"),
}


@pytest.mark.parametrize("name", KEEP.keys())
def test_near_miss_is_kept(name):
    sets = feeds()
    if name == "word_table_is_an_input":
        word = np.random.default_rng(1).standard_normal((VOCAB, 4)).astype(np.float32)
        sets = feeds(extra={"word_in": lambda b, s: word})
    elif name == "position_ids_from_an_input":
        # Arbitrary position ids (here reversed): implicit positions would be wrong.
        sets = feeds(extra={"pid_in": lambda b, s: np.arange(s)[::-1].reshape(1, s).copy()})
    model, out, pass_ = run(KEEP[name], sets=sets)
    assert pass_.matches == 0 and op_list(out) == op_list(model)


def test_sequence_length_of_another_tensor_is_not_proof():
    # The Shape is read from an input whose dim is T, not the ids' S.
    text = graph(extra_in=", float[B, T] other", sh="sh = Shape(other)")
    sets = feeds(extra={"other": lambda b, s: np.zeros((b, s), np.float32)})
    model, out, pass_ = run(text, sets=sets)
    assert pass_.matches == 0 and op_list(out) == op_list(model)


def test_portable_emits_nothing():
    model, out, pass_ = run(graph(), Target("portable"))
    assert pass_.matches == 0 and op_list(out) == op_list(model)
    assert all(n.domain == "" for n in out.graph)
