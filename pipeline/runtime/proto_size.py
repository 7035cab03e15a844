"""How big an ``onnx.ModelProto`` is, without serializing it.

With the upb protobuf backend (the one pip's protobuf ships), ``ModelProto.ByteSize()``
serializes the whole message to answer: on SmolLM2-135M (650 MB of weights) asking it cost a
transient 1.27 GB, the peak of the whole int4 run. Every "is this model large?" decision reads
the tensors' shapes and types instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import onnx
from onnx.helper import tensor_dtype_to_np_dtype

# Tensor bytes up to which a model goes as one serialized message: protobuf serializes nothing
# of 2 GB or more, and the graph's structure needs room beside the tensors.
ONE_MESSAGE_LIMIT = 1_800_000_000


def fits_one_message(model: onnx.ModelProto) -> bool:
    """Whether ``model`` can be serialized whole (else: save it with external data)."""
    return message_tensor_bytes(model) < ONE_MESSAGE_LIMIT


def message_tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held inside ``model``'s message (not in external data files):
    initializers, sparse initializers and tensor attributes, in every graph."""
    return sum(_tensor_bytes(t) for t in _tensors(model.graph))


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


# The widest a value of a typed field (int32_data, int64_data, float_data, ...) takes in the
# message: a 64-bit varint. fp16 in int32_data, for one, takes up to 5 bytes where raw takes 2.
_TYPED_VALUE_BYTES = 10


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    if not tensor.HasField("raw_data"):
        fields = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
        return _TYPED_VALUE_BYTES * sum(len(getattr(tensor, f)) for f in fields)
    try:
        itemsize = tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 8  # an unknown type: sized generously, so "large?" errs towards yes
    return math.prod(tensor.dims) * itemsize
