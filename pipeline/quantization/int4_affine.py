"""int4 weight-only that keeps grid weights, at MatMulNBits speed (``--int4-algorithm affine``).

Each block of ``block_size`` rows (along K, per output column) of a MatMul weight ``W[K, N]``
is stored as::

    w = d * (q - z) + r      q in 0..15,  d = (max - min) / 15   (GGUF's Q4_1 grid)
                             z = round(-min / d)  (MatMulNBits' uint4 zero point)
                             r = min + z * d      (what an integer zero point cannot carry)

so ``A @ W = A @ (d * (q - z)) + (A @ S) @ R``, with ``S[K, K/block]`` summing each block of A
and ``R[K/block, N]`` holding every block's ``r``. Both terms are one MatMulNBits: the block
sums are appended to A as extra columns (``Concat(A, A @ S)``, shared by every MatMul that
reads A) and R's rows to the weight as extra blocks, quantized symmetrically with their own
scales. R is small (``|r| <= d / 2``), so its rounding (at most ``max |r| / 14`` per entry) is
~15x below the bias an integer zero point alone leaves.

Why not ORT's RTN with uint4 zero points alone: it shifts every weight of a block by ``r``
(up to ``d/2``, all the same way), a bias that grows with K. On SmolLM2-135M (its weights come
from a Q4_1 GGUF, so they sit exactly on this grid) that is perplexity +25.1% and top-1
agreement 0.715 on held-out text; with ``r`` carried, +0.7% and 0.961 (docs/benchmarks.md).
Float zero points (HQQ's format) would be exact too but take MatMulNBits' slow path, and
carrying R in a separate MatMul + Add per weight (this module's first form) cost ~20% of the
decode step in node overhead.

8-bit blocks (``eight_bit_nodes``, and the int8 weight-only tier) are symmetric: ``w = d * (q -
128)``, ``d = max |w| / 127``. Zero is on that grid, so rounding errors do not share a sign
within a block and need no offsets; and GGUF's Q8_0 (how SmolLM2's tied embedding is stored)
is exactly this grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

CONTRIB = "com.microsoft"


def quantize_block(w: np.ndarray, block: int, bits: int = 4) -> tuple[np.ndarray, ...]:
    """``(q [K/block, block, N] uint8, d [K/block, N], z [K/block, N], r [K/block, N])`` with
    ``w == d * (q - z) + r`` up to rounding to the grid (exact for weights already on it).

    The grid spans the block's min and max, widened to include 0 when the block is one-signed
    (so ``z`` needs no clipping and ``|r| <= d / 2``); a block that straddles 0, as every block
    of a trained model's Q4_1 weights does, keeps its own grid exactly."""
    k, n = w.shape
    top = 2**bits - 1
    blocks = w.reshape(k // block, block, n).astype(np.float32)
    low = np.minimum(blocks.min(axis=1), 0)
    high = np.maximum(blocks.max(axis=1), 0)
    d = (high - low) / top
    d = np.where(d > 0, d, np.float32(1.0))  # an all-zero block: q = z = 0
    q = np.clip(np.rint((blocks - low[:, None]) / d[:, None]), 0, top).astype(np.uint8)
    z = np.rint(-low / d)
    r = low + z * d
    return q, d.astype(np.float32), z.astype(np.uint8), r.astype(np.float32)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' layout along the last axis: bytes as they are (8 bits) or pairs of
    nibbles, low first (4 bits)."""
    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def symmetric_blocks(w: np.ndarray, block: int, bits: int) -> tuple[np.ndarray, ...]:
    """``(q [K/block, block, N] uint8, d [K/block, N], z [K/block, N])`` on the symmetric grid
    ``w = d * (q - z)``, ``z = 2**(bits-1)``, ``d = max |w| / (z - 1)``."""
    k, n = w.shape
    middle = 2 ** (bits - 1)
    blocks = w.reshape(k // block, block, n).astype(np.float32)
    d = np.abs(blocks).max(axis=1) / (middle - 1)
    d = np.where(d > 0, d, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(blocks / d[:, None]), -middle, middle - 1) + middle
    return q.astype(np.uint8), d, np.full(d.shape, middle, np.uint8)


def offset_rows(blocks: int, block: int) -> int:
    """Rows appended to K for ``blocks`` block sums: whole blocks of their own."""
    return blocks + (-blocks) % block


def lower(
    model: onnx.ModelProto,
    *,
    block_size: int,
    accuracy_level: int,
    exclude_nodes: Sequence[str] = (),
    eight_bit_nodes: Sequence[str] = (),
    weights_dir: Path | None = None,
) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with each eligible MatMul lowered (in place); the lowered nodes' names.

    Eligible: a float32 2-D constant weight (an initializer, or ``Transpose`` of one: a tied
    ``lm_head`` reads the embedding that way) with K a multiple of ``block_size``. Nodes in
    ``eight_bit_nodes`` get symmetric 8-bit blocks: for weights that 4 bits would round too
    much, at a quarter of fp32's bytes.

    ``weights_dir``: where ``model``'s external data lies when it was loaded without it. Each
    weight is then read from disk as it is lowered, and the initializers left alone stay
    references to that data (the lowered model must be saved into the same folder): a large
    model's fp32 weights are never all in memory at once.
    """
    graph = _Graph(model, weights_dir)
    excluded = set(exclude_nodes)
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    lowered: list[str] = []
    widened: dict[tuple[str, int], str] = {}  # (activation, K) -> Concat(A, its block sums)
    for node in model.graph.node:
        weight = graph.constant_weight(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or node.name in excluded or weight.shape[0] % block_size:
            nodes.append(node)
            continue
        k, n = weight.shape
        stem = f"{node.name or node.output[0]}_affine4"
        x = node.input[0]
        if node.name in eight_bit_nodes:
            bits, rows = 8, k
            q, d, z = symmetric_blocks(weight, block_size, bits)
        else:
            bits = 4
            q, d, z, r = quantize_block(weight, block_size, bits)
            extra = offset_rows(k // block_size, block_size)
            rows = k + extra
            r = np.concatenate([r, np.zeros((extra - len(r), n), np.float32)])
            q_r, d_r, z_r = symmetric_blocks(r, block_size, bits)
            q, d, z = np.concatenate([q, q_r]), np.concatenate([d, d_r]), np.concatenate([z, z_r])
            if (x, k) not in widened:
                widened[x, k] = f"{stem}_widened"
                sums = np.repeat(np.eye(k // block_size, extra, dtype=np.float32), block_size, 0)
                added.append(numpy_helper.from_array(sums, f"{stem}_blocks"))
                nodes += [
                    helper.make_node("MatMul", [x, f"{stem}_blocks"], [f"{stem}_sums"]),
                    helper.make_node("Concat", [x, f"{stem}_sums"], [f"{stem}_widened"], axis=-1),
                ]
            x = widened[x, k]
        added += [
            numpy_helper.from_array(_pack(q.transpose(2, 0, 1), bits), f"{stem}_q"),
            numpy_helper.from_array(d.T.reshape(-1), f"{stem}_scales"),
            numpy_helper.from_array(_pack(z.T, bits), f"{stem}_zp"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [x, f"{stem}_q", f"{stem}_scales", f"{stem}_zp"],
                [node.output[0]],
                name=node.name,
                domain=CONTRIB,
                K=rows,
                N=n,
                bits=bits,
                block_size=block_size,
                accuracy_level=accuracy_level,
            )
        )
        lowered.append(node.name)
        graph.release(node.input[1])
    model.graph.ClearField("node")
    model.graph.node.extend(n for n in nodes if n not in graph.dead_nodes)
    kept = [i for i in model.graph.initializer if i.name not in graph.dead_initializers]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept + added)
    if lowered and not any(o.domain == CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    return model, lowered


class _Graph:
    """What ``lower`` reads of the model: constant weights, and readers left."""

    def __init__(self, model: onnx.ModelProto, weights_dir: Path | None) -> None:
        self.weights_dir = "" if weights_dir is None else str(weights_dir)
        self.initializers = {i.name: i for i in model.graph.initializer}
        self.producers = {out: n for n in model.graph.node for out in n.output}
        self.readers: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        for output in model.graph.output:
            self.readers[output.name] = self.readers.get(output.name, 0) + 1
        self.dead_nodes: list[onnx.NodeProto] = []
        self.dead_initializers: set[str] = set()

    def constant_weight(self, name: str) -> np.ndarray | None:
        """The float32 2-D value of ``name`` when it is an initializer or its Transpose."""
        init = self.initializers.get(name)
        transpose = self.producers.get(name)
        if init is None and transpose is not None and transpose.op_type == "Transpose":
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
            source = self.initializers.get(transpose.input[0])
            if source is not None and len(source.dims) == 2 and perm in (None, [1, 0]):
                init = source
        if init is None or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2:
            return None
        array = numpy_helper.to_array(init, self.weights_dir)
        return array if init.name == name else array.T

    def release(self, name: str) -> None:
        """One reader of ``name`` is gone: drop it (and a Transpose feeding it) if unread."""
        self.readers[name] -= 1
        if self.readers[name]:
            return
        if name in self.initializers:
            self.dead_initializers.add(name)
            return
        transpose = self.producers[name]
        self.dead_nodes.append(transpose)
        self.release(transpose.input[0])


def output_projections(model: onnx.ModelProto) -> list[str]:
    """MatMuls that write a graph output: an LM's ``lm_head``, a classifier's last layer.

    The usual choice for 8-bit blocks (llama.cpp keeps ``output.weight`` above 4 bits too):
    its error lands on the logits unattenuated. SmolLM2-135M's tied head: 4-bit blocks
    perplexity +5.8%, top-1 0.856; 8-bit +0.8%, 0.963, at the same decode speed."""
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and set(n.output) & outputs]
