"""Contrib ops' output shapes, so shape proofs survive a fused op (graph_passes/shapes.py)."""

from __future__ import annotations

import onnx_ir as ir

from graph_passes.shapes import infer_shapes
from graph_passes.testing.helpers import dynamo_sizes, model_from_text

F = ir.DataType.FLOAT


def _model() -> ir.Model:
    # A SkipLayerNormalization whose output feeds a standard Add with the graph input: after
    # refresh inference the Add's shape is the input's own [batch, seq, 4].
    return model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[batch, seq, 4] x, float[batch, seq, 4] r) => (float[batch, seq, 4] y) {
            g4 = Constant <value = float[4] {1, 1, 1, 1}> ()
            b4 = Constant <value = float[4] {0, 0, 0, 0}> ()
            s = com.microsoft.SkipLayerNormalization <epsilon: float = 1e-5> (x, r, g4, b4)
            t = Relu(s)
            y = Add(t, x)
        }
        """
    )


def test_refresh_carries_symbols_across_contrib_nodes():
    model = _model()
    infer_shapes(model, refresh=True)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert [str(d) for d in relu.outputs[0].shape] == ["batch", "seq", "4"]


def test_without_refresh_onnx_cannot_see_past_a_contrib_node():
    model = _model()
    infer_shapes(model)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert relu.outputs[0].shape is None


def test_packed_attention_output_is_batch_sequence_and_value_width():
    x = ir.Value(name="x", type=ir.TensorType(F), shape=ir.Shape(["B", "S", 8]))
    w = ir.Value(name="w", type=ir.TensorType(F), shape=ir.Shape([8, 24]))
    b = ir.Value(name="b", type=ir.TensorType(F), shape=ir.Shape([24]))
    node = ir.Node("com.microsoft", "Attention", [x, w, b], [ir.AttrInt64("num_heads", 2)])
    from graph_passes.shapes import output_shape

    assert [str(d) for d in output_shape(node)] == ["B", "S", "8"]
    node.attributes["qkv_hidden_sizes"] = ir.AttrInt64s("qkv_hidden_sizes", [8, 8, 8])
    assert output_shape(node) is None


# -- shape vectors ONNX's data propagation does not follow ------------------------------

# The dynamo exporter (optimize=False) reads every size as Reshape(Squeeze(Shape(x)[i:i+1]),
# [-1]) (``dynamo_sizes``), which ONNX's data propagation does not follow; a BERT without
# token_type_ids then expands its buffered ids to [batch, sequence] and slices its position
# ids to the sequence.
SYM_SIZE_EMBEDDINGS = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[batch, sequence] mask, float[batch, sequence, 4] words) => (float[batch, sequence, 4] y)
  <int64[1] minus_one = {-1}, int64[1] zero = {0}, int64[1] one = {1},
   int64[1, 16] buffer = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
   int64[1, 16] positions = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
   float[16, 4] table = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
     20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41,
     42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63}> {
{sizes}
  ids = Slice(buffer, zero, seq, one)
  size = Concat <axis = 0> (batch, seq)
  types = Expand(ids, size)
  typed = Gather(table, types)
  pos = Slice(positions, zero, seq, one)
  placed = Gather(table, pos)
  summed = Add(words, typed)
  both = Add(summed, placed)
  act = Relu(both)
  y = Identity(act)
}
"""


def _shapes(model: ir.Model) -> dict[str, list[str]]:
    return {
        out.name: None if out.shape is None else [str(d) for d in out.shape]
        for node in model.graph
        for out in node.outputs
    }


def test_refresh_follows_sizes_through_reshape_expand_slice_and_broadcast():
    model = model_from_text(SYM_SIZE_EMBEDDINGS.replace("{sizes}", dynamo_sizes("mask")))
    infer_shapes(model, refresh=True)
    shapes = _shapes(model)
    assert shapes["types"] == ["batch", "sequence"]  # Expand(ids, [batch, sequence])
    assert shapes["ids"] == ["1", "Min(16, sequence)"]  # the unsliced axis stays 1
    assert shapes["placed"] == ["1", "Min(16, sequence)", "4"]
    # Min(16, S) broadcast against S is S (any other S fails at run time)
    assert shapes["both"] == ["batch", "sequence", "4"]
    assert shapes["act"] == ["batch", "sequence", "4"]


def test_refine_does_not_claim_what_broadcasting_leaves_open():
    """An unknown dim against a symbol may be 1 or the symbol: nothing is claimed; a size
    against an unknown dim is the size."""
    model = model_from_text(
        """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 1] x, int64[2] t, int64[batch, sequence] m) => (float[?, ?] y, float[?, ?] z)
  <int64[1] minus_one = {-1}, int64[1] three = {3}> {
{sizes}
  size = Concat <axis = 0> (batch, three)
  e = Expand(x, size)
  y = Relu(e)
  f = Expand(x, t)
  z = Relu(f)
}""".replace("{sizes}", dynamo_sizes("m"))
    )
    infer_shapes(model, refresh=True)
    shapes = _shapes(model)
    assert shapes["e"][0].startswith("unk__") and shapes["e"][1] == "3"  # N vs batch: open
    assert all(d.startswith("unk__") for d in shapes["f"])


def test_reshape_minus_one_follows_when_the_symbols_cancel():
    """ONNX resolves a -1 only when every other entry is a known size; here the entries are
    x's own symbols, read through dynamo's Reshape(Squeeze(Shape(x)[i:i+1]), [-1])."""
    model = model_from_text(
        """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, 8] x) => (float[?, ?, ?, ?] y, float[?, ?, ?] z, float[?, ?, ?] w)
  <int64[1] minus_one = {-1}, int64[1] two = {2}, int64[1] four = {4}> {
{sizes}
  heads = Concat <axis = 0> (batch, minus_one, two, four)
  h = Reshape(x, heads)
  y = Relu(h)
  merged = Concat <axis = 0> (batch, seq, minus_one)
  m = Reshape(h, merged)
  z = Relu(m)
  odd = Concat <axis = 0> (batch, minus_one, four)
  o = Reshape(x, odd)
  w = Relu(o)
}""".replace("{sizes}", dynamo_sizes("x"))
    )
    infer_shapes(model, refresh=True)
    shapes = _shapes(model)
    assert shapes["h"] == ["B", "S", "2", "4"]  # B * S * 8 / (B * 2 * 4)
    assert shapes["m"] == ["B", "S", "8"]
    assert shapes["o"][0] == "B" and shapes["o"][1].startswith("unk__")  # 2 * S: no symbol


def test_an_unchanged_model_is_not_inferred_again(monkeypatch):
    """Most passes change nothing and each asks for shapes: the second call on the same graph
    runs no inference; a cleared shape or a new node makes the next call infer again."""
    import graph_passes.shapes as shapes

    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
  a = Relu(x)
  y = Neg(a)
}"""
    )
    rounds = []
    real = shapes._onnx_inference
    monkeypatch.setattr(shapes, "_onnx_inference", lambda m: (rounds.append(1), real(m)))
    infer_shapes(model)
    first = len(rounds)
    infer_shapes(model)
    assert first >= 1 and len(rounds) == first
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.outputs[0].shape = None
    infer_shapes(model)
    assert len(rounds) > first and relu.outputs[0].shape is not None
    count = len(rounds)
    extra = ir.Node("", "Abs", [relu.outputs[0]])
    model.graph.append(extra)
    infer_shapes(model)
    assert len(rounds) > count and extra.outputs[0].shape is not None


def test_a_refresh_is_skipped_only_after_a_refresh(monkeypatch):
    """A refresh after a plain call infers again (the plain call may have kept stale
    symbols); a second refresh of the same graph does not."""
    import graph_passes.shapes as shapes

    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
  y = Relu(x)
}"""
    )
    rounds = []
    real = shapes._onnx_inference
    monkeypatch.setattr(shapes, "_onnx_inference", lambda m: (rounds.append(1), real(m)))
    infer_shapes(model)
    plain = len(rounds)
    infer_shapes(model, refresh=True)
    refreshed = len(rounds)
    infer_shapes(model, refresh=True)
    infer_shapes(model)
    assert plain < refreshed == len(rounds)
