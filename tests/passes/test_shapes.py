"""Contrib ops' output shapes, so shape proofs survive a fused op (graph_passes/shapes.py)."""

from __future__ import annotations

import onnx_ir as ir

from graph_passes.shapes import infer_shapes
from graph_passes.testing.helpers import model_from_text

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
