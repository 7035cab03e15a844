"""``message_tensor_bytes``: a model's in-message tensor bytes, read from shapes and types."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.runtime.proto_size import message_tensor_bytes


def _model() -> tuple[onnx.ModelProto, list[TensorProto]]:
    """A model with tensor data in every place a message holds it, plus one external tensor;
    also the in-message tensors (their ``raw_data`` is the truth to compare with)."""
    weight = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    constant = numpy_helper.from_array(np.arange(5, dtype=np.int64), "c")
    inner = numpy_helper.from_array(np.ones((2, 2), np.float16), "inner")
    deep = numpy_helper.from_array(np.ones(7, np.uint8), "deep")
    sparse_values = numpy_helper.from_array(np.ones(2, np.float32), "s")
    sparse_indices = numpy_helper.from_array(np.array([0, 3], np.int64), "s_idx")
    sparse = helper.make_sparse_tensor(sparse_values, sparse_indices, [4])
    external = TensorProto(name="far", data_type=TensorProto.FLOAT, dims=[1000])
    external.data_location = TensorProto.EXTERNAL
    external.external_data.add(key="location", value="far.data")
    then_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["k"], value=deep),
            helper.make_node("Add", ["inner", "k"], ["t"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT16, [2, 2])],
        [inner],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c_out"], value=constant),
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=then_branch, else_branch=then_branch
            ),
        ],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 2])],
        [weight, external],
    )
    graph.sparse_initializer.append(sparse)
    held = [weight, constant, inner, deep, sparse_values, sparse_indices]
    # the If's two branches are one graph, counted twice
    return helper.make_model(graph), held + [inner, deep]


def test_it_counts_every_tensor_held_in_the_message_and_no_external_one():
    model, held = _model()
    assert message_tensor_bytes(model) == sum(len(t.raw_data) for t in held)


def test_it_is_the_bulk_of_what_the_serialized_message_holds():
    weights = [numpy_helper.from_array(np.ones((256, 256), np.float32), f"w{i}") for i in range(4)]
    nodes = [helper.make_node("MatMul", ["x", w.name], [f"y{i}"]) for i, w in enumerate(weights)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 256]) for i in range(4)],
        weights,
    )
    model = helper.make_model(graph)
    size = message_tensor_bytes(model)
    assert size == 4 * 256 * 256 * 4
    assert 0 < model.ByteSize() - size < 2_000


def test_one_message_holds_tensors_below_the_limit_only(monkeypatch):
    from pipeline.runtime import proto_size

    model, held = _model()
    size = sum(len(t.raw_data) for t in held)
    assert proto_size.fits_one_message(model)
    monkeypatch.setattr(proto_size, "ONE_MESSAGE_LIMIT", size)
    assert not proto_size.fits_one_message(model)
    monkeypatch.setattr(proto_size, "ONE_MESSAGE_LIMIT", size + 1)
    assert proto_size.fits_one_message(model)


def test_values_in_typed_fields_are_never_undercounted():
    """fp16 kept in ``int32_data`` (as ``helper.make_tensor`` stores it) takes more than its 2
    bytes a value in the message; int64 varints up to 10."""
    values = np.linspace(-60000, 60000, 4096)
    tensors = [
        helper.make_tensor("h", TensorProto.FLOAT16, [4096], values.astype(np.float16)),
        helper.make_tensor("i", TensorProto.INT64, [4096], (values * 1e9).astype(np.int64)),
        helper.make_tensor("f", TensorProto.FLOAT, [4096], values.astype(np.float32)),
    ]
    graph = helper.make_graph([], "g", [], [], tensors)
    model = helper.make_model(graph)
    assert not any(t.HasField("raw_data") for t in model.graph.initializer)
    assert message_tensor_bytes(model) >= sum(t.ByteSize() for t in model.graph.initializer)
