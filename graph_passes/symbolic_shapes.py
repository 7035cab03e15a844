"""Shapes from ONNX Runtime's symbolic shape inference, for what ONNX's own inference loses.

Used by fusions that must prove shapes (SkipLayerNorm's residual Add) or need concrete
sizes for timing (attention's mask bias, graph_passes/kernel_timing.py).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

logger = logging.getLogger(__name__)

Dims = tuple[int | str | None, ...]


def symbolic_dims(model: ir.Model) -> dict[str, Dims]:
    """Shapes from ONNX Runtime's symbolic shape inference, by value name ({} on failure).

    ONNX's own inference gives up on shapes computed at run time (``Reshape(x,
    Concat(Shape(x)[0], ...))`` after attention) and names each unknown dim afresh, so a
    residual ``Add([B, S, C], [B, unk, C])`` cannot be proven shape-preserving. ORT's
    symbolic inference follows the shape arithmetic. It runs with ``auto_merge=False``: it
    never assumes two unknown dims equal (with merging on it would, which proves nothing).
    Big weights are given to it as inputs of their shape: it only reads small shape tensors.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # Weights become graph inputs of their type and shape on a clone (which shares the
        # tensors): nothing is copied or read but the small shape constants.
        work = model.clone()
        for name, value in list(work.graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or tensor.nbytes > 1024:
                del work.graph.initializers[name]
                if not value.is_graph_input():
                    work.graph.inputs.append(value)
        proto = ir.to_proto(work)
        del proto.graph.value_info[:]  # its own inference, not ONNX's fresh unk__ symbols
        # ORT's static ``infer_shapes`` throws the partial result away (and saves
        # "sym_shape_infer_temp.onnx" into the working directory) when one value stays
        # unknown; its steps are driven here instead so every proven shape is kept.
        inference = SymbolicShapeInference(2**31 - 1, False, False, 0)
        inference._preprocess(proto)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        inferred = inference.out_mp_
    except Exception as exc:  # noqa: BLE001 - any failure just means no extra shape facts
        logger.debug("symbolic shape inference failed: %s", exc)
        return {}
    found: dict[str, Dims] = {}
    graph = inferred.graph
    for info in (*graph.value_info, *graph.input, *graph.output):
        kind = info.type.WhichOneof("value")
        if kind != "tensor_type" or not info.type.tensor_type.HasField("shape"):
            continue
        dims = []
        for d in info.type.tensor_type.shape.dim:
            which = d.WhichOneof("value")
            dims.append(d.dim_value if which == "dim_value" else (d.dim_param or None))
        found[info.name] = tuple(dims)
    return found
