"""2:4 structured sparsity: 2 of every 4 consecutive weights along the reduction axis are zero.

TensorRT's sparse kernels (NVIDIA Ampere and newer) take a convolution or fully connected
weight when, for each output channel, every group of four consecutive *input* channels
holds at least two zeros (TensorRT Developer Guide, "Structured Sparsity"). For ONNX
``MatMul(x, W)`` with ``W`` ``[K, N]`` the input channels are the rows ``K``: the groups
run down each column, ``W[4g:4g+4, n]``. ``Gemm`` with ``transB=1`` stores ``W`` as
``[N, K]``, so there they run along axis 1.

Which weights: every standard ``MatMul`` / ``Gemm`` with a constant 2-D float weight whose
reduction dimension ``K`` is a multiple of 4 (``find_weights``), except

- the projection that produces a graph output (maybe through a bias ``Add``): the logits
  of a language model or a classifier head. Nothing after it can absorb the error, every
  output moves with it, and in a causal LM it is often the embedding matrix tied; Wanda
  and SparseGPT leave it dense for the same reasons;
- an embedding ``Gather`` is never a candidate: it reads rows of its table, it does not
  multiply by it, so no sparse kernel applies.

Which two go: Wanda's score ``|W_kn| * ||x_k||`` (``keep_mask``), ``||x_k||`` the norm of
input channel ``k`` over the calibration tokens (``moments.energies``). Magnitude alone
would keep a large weight on a channel that is nearly always zero and zero a small one on
a channel that carries the signal; the score is the size of what each weight contributes.

A weight shared by several nodes gets its own sparse copy per node (``Rewrite.swap``), so
a tied embedding table read by a ``Gather`` stays dense there. ``violations`` counts the
groups that break the pattern: the stage runs it on the saved model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graph_passes.base import constant_array
from graph_passes.match import FLOAT_TYPES, all_names, is_op
from pipeline.pruning import moments
from pipeline.pruning.graph import Rewrite
from pipeline.runtime.sessions import Feeds, Session

GROUP, KEPT = 4, 2  # of each GROUP consecutive weights along K, KEPT stay


@dataclass(frozen=True)
class SparseWeight:
    """A node whose constant weight (input 1) gets the pattern; ``axis``: its reduction axis
    as stored (0 for ``MatMul`` and ``Gemm``; 1 for ``Gemm`` with ``transB=1``)."""

    node: ir.Node
    axis: int

    @property
    def name(self) -> str:
        return self.node.name or self.node.inputs[1].name


def _weight_axis(node: ir.Node) -> tuple[np.ndarray, int] | None:
    """The constant 2-D float weight of a ``MatMul(x, W)`` or ``Gemm(x, W)`` whose ``x`` is
    computed (not constant, not transposed), and its reduction axis."""
    if not is_op(node, "MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    x, weight = node.inputs[0], node.inputs[1]
    if x is None or weight is None or weight.dtype not in FLOAT_TYPES:
        return None
    if constant_array(x) is not None or node.attributes.get_int("transA", 0):
        return None
    array = constant_array(weight)
    if array is None or array.ndim != 2:
        return None
    return array, node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 0


def _produces_output(node: ir.Node) -> bool:
    """The node's result is a graph output, directly or through one ``Add`` (its bias)."""
    out = node.outputs[0]
    if out.is_graph_output():
        return True
    uses = list(out.uses())
    if len(uses) != 1 or not is_op(uses[0].node, "Add"):
        return False
    return uses[0].node.outputs[0].is_graph_output()


def find_weights(model: ir.Model) -> tuple[list[SparseWeight], list[dict]]:
    """The weights that take the pattern, in graph order, and a row per constant-weight
    MatMul/Gemm left dense with the reason."""
    found, skipped = [], []
    for node in model.graph:
        weight = _weight_axis(node)
        if weight is None:
            continue
        array, axis = weight
        candidate = SparseWeight(node, axis)
        if _produces_output(node):
            reason = "produces a graph output (logits): left dense"
        elif array.shape[axis] % GROUP:
            reason = f"reduction dimension {array.shape[axis]} is not a multiple of {GROUP}"
        else:
            found.append(candidate)
            continue
        skipped.append({"node": candidate.name, "shape": list(array.shape), "reason": reason})
    return found, skipped


def keep_mask(weight: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """For ``weight`` ``[K, N]`` (reduction axis first) and the input channels' norms ``[K]``:
    True for the ``KEPT`` of each ``GROUP`` consecutive rows of each column with the largest
    ``|W_kn| * ||x_k||`` (ties: the earlier row stays)."""
    rows, cols = weight.shape
    score = np.abs(weight.astype(np.float64)) * np.asarray(norms, np.float64)[:, None]
    grouped = score.reshape(rows // GROUP, GROUP, cols)
    order = np.argsort(-grouped, axis=1, kind="stable")
    keep = np.zeros(grouped.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :KEPT, :], True, axis=1)
    return keep.reshape(rows, cols)


def violations(array: np.ndarray, axis: int) -> int:
    """How many groups of ``GROUP`` consecutive weights along ``axis`` hold more than
    ``KEPT`` non-zeros (0: TensorRT's sparse kernels can take it)."""
    along = np.moveaxis(np.asarray(array), axis, 0)
    if along.shape[0] % GROUP:
        raise ValueError(f"reduction dimension {along.shape[0]} is not a multiple of {GROUP}")
    grouped = along.reshape(along.shape[0] // GROUP, GROUP, -1)
    return int((np.count_nonzero(grouped, axis=1) > KEPT).sum())


def apply(
    model: ir.Model, groups_for: Callable[[Session], Sequence[Iterable[Feeds]]]
) -> tuple[list[dict], list[dict]]:
    """Give every eligible weight of ``model`` the 2:4 pattern, in place, choosing by the
    input-channel norms on the calibration groups; one row per weight (the new initializer's
    name, non-zeros before and after) and the rows of the weights left dense."""
    found, skipped = find_weights(model)
    energy = moments.energies(model, [w.node.inputs[0] for w in found], groups_for)
    rewrite = Rewrite(model.graph, all_names(model))
    rows = []
    for weight, channel_energy in zip(found, energy, strict=True):
        array = constant_array(weight.node.inputs[1])
        along = np.moveaxis(array, weight.axis, 0)
        kept = np.where(keep_mask(along, np.sqrt(channel_energy)), along, 0)
        sparse = np.moveaxis(kept, 0, weight.axis)
        before, after = int(np.count_nonzero(array)), int(np.count_nonzero(sparse))
        rewrite.swap(weight.node, 1, sparse)
        rows.append(
            {
                "node": weight.name,
                "op": weight.node.op_type,
                "weight": weight.node.inputs[1].name,
                "shape": list(array.shape),
                "axis": weight.axis,
                "nonzero_before": before,
                "nonzero_after": after,
                "zeroed": before - after,
                "zeroed_share": (before - after) / array.size,
            }
        )
    rewrite.finish()
    return rows, skipped


def check_saved(model: ir.Model, rows: list[dict]) -> dict:
    """The pattern checked on ``model`` (the saved one): every row's weight, by name."""
    initializers = model.graph.initializers
    broken = {
        row["weight"]: count
        for row in rows
        if (count := violations(initializers[row["weight"]].const_value.numpy(), row["axis"]))
    }
    return {"passed": not broken, "weights_checked": len(rows), "violations": broken}
