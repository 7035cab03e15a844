"""The decomposed-LayerNorm matcher, shared by the passes that fuse LayerNorm or fuse more
around it (fuse_layer_norm, fuse_skip_layer_norm, fuse_embed_layer_norm) and by the
expected-fusion report. The pattern and its checks are documented in ``layer_norm.py``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graph_passes.base import (
    constant_array,
    constant_tensor,
    is_standard,
    outside_use,
    reduces_last_axis,
)
from graph_passes.match import FLOAT_TYPES, is_op, producer, split_producer

logger = logging.getLogger(__name__)


class LayerNormMatcher:
    """Matches ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul[/Add] in a model of
    default-domain ``opset`` (ReduceMean's axes are an attribute or an input by opset)."""

    def __init__(self, opset: int) -> None:
        self._opset = opset

    def match(self, root: ir.Node) -> tuple | None:
        """``(x, gamma, beta, eps, nodes)`` of the pattern ending at ``root``, else None.

        Shapes must have been inferred (the checks read x's rank and last dim).
        """
        beta = None
        scale = root
        if is_op(root, "Add"):
            scale, beta = split_producer(root, "Mul")
            if scale is None:
                return None
        if not is_op(scale, "Mul"):
            return None
        norm, gamma = split_producer(scale, "Div", "Mul")
        if norm is None:
            return None
        if is_op(norm, "Div"):
            d, std = norm.inputs
            recip = None
        else:
            recip, d = split_producer(norm, "Reciprocal", allow_constant=False)
            std = None if recip is None else recip.inputs[0]
        sqrt, sub = producer(std, "Sqrt"), producer(d, "Sub")
        if sqrt is None or sub is None:
            return None
        add_eps = producer(sqrt.inputs[0], "Add")
        var_mean, eps = split_producer(add_eps, "ReduceMean")
        if var_mean is None:
            return None
        square = producer(var_mean.inputs[0], "Pow", "Mul")
        x, mean = sub.inputs
        mean_node = producer(mean, "ReduceMean")
        if square is None or mean_node is None or mean_node.inputs[0] is not x or x is None:
            return None
        if square.inputs[0] is not d or not self._is_square(square):
            return None
        nodes = [mean_node, sub, square, var_mean, add_eps, sqrt, recip, norm, scale]
        nodes = [n for n in nodes if n is not None] + ([root] if beta is not None else [])
        if not self._checks(x, gamma, beta, eps, mean_node, var_mean, nodes, root):
            return None
        return x, gamma, beta, float(constant_array(eps).reshape(-1)[0]), nodes

    def _is_square(self, node: ir.Node) -> bool:
        if node.op_type == "Mul":
            return node.inputs[1] is node.inputs[0]
        exponent = constant_array(node.inputs[1])
        return (
            exponent is not None
            and exponent.size == 1
            and exponent.ndim <= 1
            and (float(exponent.reshape(-1)[0]) == 2.0)
        )

    def _checks(self, x, gamma, beta, eps, mean_node, var_mean, nodes, root) -> bool:
        """Constants, dtypes, axes and private intermediates; logs why a match is rejected."""
        reason = None
        dtype = x.dtype
        eps_array = constant_array(eps)
        last = x.shape[-1] if x.shape is not None and len(x.shape) > 0 else None
        rank = None if x.shape is None else len(x.shape)
        if dtype not in FLOAT_TYPES:
            reason = f"x dtype {dtype} is not float/float16/bfloat16"
        elif eps_array is None or eps_array.size != 1 or eps_array.ndim > 1:
            reason = "eps is not a one-element constant"
        elif not np.isfinite(eps_array).all():
            reason = "eps is not finite"
        elif not all(reduces_last_axis(n, rank, self._opset) for n in (mean_node, var_mean)):
            reason = "ReduceMean is not over the last axis alone with keepdims=1"
        elif not all(self._param_ok(p, dtype, last) for p in (gamma, beta) if p is not None):
            reason = "gamma/beta are not constants of shape [C] matching x"
        elif any(n.graph is not root.graph or not is_standard(n) for n in nodes):
            reason = "nodes span graphs or domains"
        else:
            reason = outside_use(nodes)
        if reason is not None:
            logger.debug("LayerNorm at %s not fused: %s", root.name, reason)
        return reason is None

    def _param_ok(self, value: ir.Value, dtype: ir.DataType, last) -> bool:
        tensor = constant_tensor(value)
        if tensor is None or len(tensor.shape) != 1 or tensor.dtype != dtype:
            return False
        return tensor.shape[0] == last if isinstance(last, int) else tensor.shape[0] > 1
