"""Value types onnx-ir cannot hold (maps, and sequences or optionals of maps), carried around it.

scikit-learn classifiers converted with ZipMap output ``seq(map(int64, tensor(float)))``.
onnx-ir 1.1 refuses to deserialize map types at all, and a tool that drops such a type
writes a model ONNX Runtime rejects ("Invalid tensor data type 0"). So, before a proto
becomes an IR model, ``detach`` takes every map-bearing type out of it: graph inputs and
outputs keep their name with the type left unset, and the exact ``TypeProto`` bytes are
stashed by value name in the main graph's ``meta`` (which ``Model.clone`` copies and
serialization ignores). ``to_proto`` puts them back whenever the model is serialized, so
the checker, ONNX Runtime and the saved file all see the original types. Passes never
touch these values: they come from non-standard ops (ZipMap) that no pass rewrites, and a
graph output keeps its name through every rewrite.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx_ir as ir

META_KEY = "opaque_types"


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _has_map(type_proto: onnx.TypeProto) -> bool:
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind == "sequence_type":
        return _has_map(type_proto.sequence_type.elem_type)
    if kind == "optional_type":
        return _has_map(type_proto.optional_type.elem_type)
    return False


def detach(proto: onnx.ModelProto) -> dict[str, bytes]:
    """Clear map-bearing types from ``proto`` in place; return name -> TypeProto bytes.

    Graph inputs and outputs keep their entry (type unset); intermediate ``value_info``
    entries with such types are dropped (they are optional annotations).
    """
    stash: dict[str, bytes] = {}
    for graph in _graphs(proto.graph):
        for info in [*graph.input, *graph.output]:
            if info.HasField("type") and _has_map(info.type):
                stash[info.name] = info.type.SerializeToString()
                info.ClearField("type")
        kept = [info for info in graph.value_info if not _has_map(info.type)]
        if len(kept) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(kept)
    return stash


def attach(model: ir.Model, stash: dict[str, bytes]) -> None:
    """Remember the detached types on ``model`` so ``to_proto`` can restore them."""
    if stash:
        model.graph.meta[META_KEY] = dict(stash)


def has_opaque_types(model: ir.Model) -> bool:
    return bool(model.graph.meta.get(META_KEY))


def restore(proto: onnx.ModelProto, model: ir.Model) -> onnx.ModelProto:
    """Put the detached types back into a proto serialized from ``model`` (in place)."""
    stash: dict[str, bytes] = model.graph.meta.get(META_KEY) or {}
    if not stash:
        return proto
    for graph in _graphs(proto.graph):
        for info in [*graph.input, *graph.output]:
            if info.name in stash and not info.HasField("type"):
                info.type.ParseFromString(stash[info.name])
    return proto


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """``ir.to_proto`` with the opaque types restored: use it for every serialization."""
    return restore(ir.to_proto(model), model)
