"""Evaluate a set of constant nodes with ONNX Runtime (the engine behind ``fold_constants``).

The nodes are copied into one small model that computes the values asked for from the
constants the nodes read, and that model runs once on the CPU with every ONNX Runtime
optimization disabled (so ORT's own rewrites cannot change what we compute). One session
for a whole constant subgraph is much faster than one per node, but one node ORT cannot
run (an op missing for some dtype) makes that session fail; ``evaluate_each`` is the slow,
robust fallback that runs node by node and skips what fails.

Constants of a numpy dtype are fed as inputs rather than stored as initializers: numpy
arrays (memory-mapped for external data) go to ORT without a copy and the small model
never approaches protobuf's 2 GB limit. ORT's Python API cannot take or return bfloat16,
float8 or 4-bit tensors, so those constants stay initializers and such results are
fetched through an exact ``Cast`` to float32 / int32 and converted back with ``ml_dtypes``.
A result always carries the dtype ORT computed, checked against the declared one: a
folded value is never re-typed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from pipeline.runtime import sessions as runners

logger = logging.getLogger(__name__)

Results = dict[ir.Value, ir.TensorProtocol]
Feeds = dict[str, np.ndarray]


def evaluate(
    nodes: Sequence[ir.Node],
    wanted: Sequence[ir.Value],
    model: ir.Model,
    constants: Mapping[ir.Value, ir.TensorProtocol],
) -> Results:
    """Tensors of ``wanted`` computed by ``nodes`` (topologically sorted) in one session.

    ``constants`` holds the tensor of every value the nodes read that no node computes.
    Raises whatever ONNX Runtime raises when the session cannot be created or run. Wanted
    values that are not plain tensors (sequences, optionals, strings) are left out.
    """
    return _run(nodes, wanted, model, constants)


def evaluate_each(
    nodes: Sequence[ir.Node], model: ir.Model, constants: Mapping[ir.Value, ir.TensorProtocol]
) -> Results:
    """Every output of ``nodes`` that could be computed, one tiny session per node.

    A node that fails is skipped, and so is every node that reads one of its outputs.
    """
    known: Results = dict(constants)
    results: Results = {}
    for node in nodes:
        if not all(v is None or v in known for v in node.inputs):
            continue
        outputs = [v for v in node.outputs if v.uses() or v.is_graph_output()]
        try:
            computed = _run([node], outputs, model, known)
        except Exception as exc:  # ORT lacks the op for these dtypes, bad attributes, ...
            logger.debug(
                "cannot evaluate %s node %r: %s",
                node.op_type,
                node.name,
                " ".join(str(exc).split())[:200],
            )
            continue
        if len(computed) == len(outputs):
            results.update(computed)
            known.update(computed)
    return results


def _run(
    nodes: Sequence[ir.Node],
    wanted: Sequence[ir.Value],
    model: ir.Model,
    constants: Mapping[ir.Value, ir.TensorProtocol],
) -> Results:
    mini, feeds = _build(nodes, wanted, model, constants, {})
    session = runners.create_session(mini)
    dtypes = [_dtype(output.type) for output in session.inner.get_outputs()]
    exotic = {v: d for v, d in zip(wanted, dtypes, strict=True) if d and _numpy_lacks(d)}
    if exotic:  # numpy cannot receive these from ORT: fetch them through an exact Cast
        mini, feeds = _build(nodes, wanted, model, constants, exotic)
        session = runners.create_session(mini)
    arrays = session.inner.run(None, feeds)
    results: Results = {}
    for value, array, dtype in zip(wanted, arrays, dtypes, strict=True):
        tensor = _to_tensor(value, array, dtype)
        if tensor is not None:
            results[value] = tensor
    return results


def _build(
    nodes: Sequence[ir.Node],
    wanted: Sequence[ir.Value],
    model: ir.Model,
    constants: Mapping[ir.Value, ir.TensorProtocol],
    exotic: Mapping[ir.Value, ir.DataType],
) -> tuple[ir.Model, Feeds]:
    """A model computing ``wanted`` from copies of ``nodes``, and the feeds it needs.

    Values in ``exotic`` are returned cast to float32 (floating types) or int32.
    """
    copies: dict[ir.Value, ir.Value] = {}
    inputs: list[ir.Value] = []
    initializers: list[ir.Value] = []
    feeds: Feeds = {}

    def copy_of(value: ir.Value | None) -> ir.Value | None:
        if value is None:
            return None
        if value not in copies:  # a constant read by the nodes
            tensor = constants[value]
            name = value.name or f"constant_{len(copies)}"
            copy = ir.Value(
                name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape)
            )
            if _numpy_lacks(tensor.dtype) or tensor.dtype == ir.DataType.STRING:
                copy.const_value = _unshared(tensor, name)
                initializers.append(copy)
            else:
                feeds[name] = tensor.numpy()
                inputs.append(copy)
            copies[value] = copy
        return copies[value]

    new_nodes = []
    for node in nodes:
        new = ir.Node(
            node.domain,
            node.op_type,
            [copy_of(v) for v in node.inputs],
            attributes=list(node.attributes.values()),
            overload=node.overload,
            num_outputs=len(node.outputs),
            version=node.version,
            name=node.name,
        )
        for old, out in zip(node.outputs, new.outputs, strict=True):
            out.name = old.name or None
            out.type = old.type  # ORT checks the type it infers against this one
            copies[old] = out
        new_nodes.append(new)
    outputs = []
    for value in wanted:
        out = copies[value]
        if value in exotic:
            to = ir.DataType.FLOAT if exotic[value].is_floating_point() else ir.DataType.INT32
            cast = ir.Node("", "Cast", [out], attributes=[ir.AttrInt64("to", to)])
            new_nodes.append(cast)
            out = cast.outputs[0]
        outputs.append(out)
    graph = ir.Graph(
        inputs,
        outputs,
        nodes=new_nodes,
        initializers=initializers,
        opset_imports=dict(model.opset_imports),
        name="constant_subgraph",
    )
    return ir.Model(graph, ir_version=model.ir_version), feeds


def _unshared(tensor: ir.TensorProtocol, name: str) -> ir.TensorProtocol:
    """``tensor``, or a copy when serializing it as ``name`` would rename it in place.

    onnx-ir names an initializer's tensor after its value when it serializes; the tensor
    of a ``Constant`` node belongs to the caller's model and must not change.
    """
    if tensor.name == name:
        return tensor
    if tensor.dtype == ir.DataType.STRING:
        return ir.StringTensor(tensor.numpy().ravel().tolist(), shape=ir.Shape(tensor.shape))
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype)


def _dtype(ort_type: str) -> ir.DataType | None:
    """``tensor(bfloat16)`` -> DataType.BFLOAT16; None for sequences, maps, optionals."""
    if not (ort_type.startswith("tensor(") and ort_type.endswith(")")):
        return None
    return ir.DataType.__members__.get(ort_type[len("tensor(") : -1].upper())


def _numpy_lacks(dtype: ir.DataType) -> bool:
    """True for bfloat16, float8, 4-bit ... types that only exist in numpy via ml_dtypes."""
    try:
        return np.dtype(dtype.numpy()).type.__module__ == "ml_dtypes"
    except TypeError:
        return False


def _to_tensor(value: ir.Value, array: object, dtype: ir.DataType | None) -> ir.Tensor | None:
    """The result as a tensor of ``dtype`` (what ORT computed), or None when not a tensor."""
    if dtype is None or not isinstance(array, np.ndarray) or dtype == ir.DataType.STRING:
        return None
    try:
        if _numpy_lacks(dtype):
            array = array.astype(dtype.numpy())  # exact: it was cast from this dtype
        elif ir.DataType.from_numpy(array.dtype) != dtype:
            logger.debug("%s: ORT returned %s, not %s", value.name, array.dtype, dtype)
            return None
        return ir.Tensor(np.ascontiguousarray(array), dtype=dtype)
    except (TypeError, ValueError) as exc:
        logger.debug("%s: cannot keep the result (%s)", value.name, exc)
        return None
