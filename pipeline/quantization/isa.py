"""Which 8-bit types suit this CPU: read from its flags (pipeline.runtime.machine), not guessed.

ONNX Runtime's CPU int8 kernels (MLAS) multiply uint8 activations by int8 weights (U8S8).

* x86 with VNNI (``avx512_vnni`` or ``avx_vnni``): ``VPDPBUSD`` accumulates u8 x s8 products
  straight into int32, exactly. U8S8 with full 8-bit weights is both fastest and exact.
* x86 with AVX2 but no VNNI: ``VPMADDUBSW`` adds two u8 x s8 products into a *saturating*
  int16. Two products of 255 x 127 overflow it, so full-range weights can silently clip.
  ONNX Runtime's documented remedy is ``reduce_range`` (7-bit weights: 2 x 255 x 63 fits),
  which costs one bit of weight precision but never saturates.
* ARM64 (``asimddp``/``i8mm``: ``SDOT``/``SMMLA`` are signed): S8S8 QDQ is the natural
  format; dynamic quantization (``DynamicQuantizeLinear``) only produces uint8 activations,
  so dynamic stays U8S8.

The choice is a starting point: the accuracy guard measures the result, and ``auto``
measures latency, so a wrong guess costs speed or gets caught, never ships silently.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass

from pipeline.runtime import machine as this_machine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IsaChoice:
    """The 8-bit types picked for this CPU and why."""

    isa: str  # vnni | avx2 | arm64 | other
    activation_type: str  # uint8 | int8 (static QDQ activations)
    reduce_range: bool  # 7-bit weights (AVX2 without VNNI)
    reason: str


def choose_int8_types(flags: frozenset[str] | None = None, machine: str | None = None) -> IsaChoice:
    """Pick activation type and weight range from the CPU's instruction set."""
    flags = this_machine.cpu().flags if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64") or "asimd" in flags:
        return IsaChoice(
            "arm64", "int8", False, "ARM64: signed dot products (SDOT), S8S8 QDQ activations"
        )
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return IsaChoice(
            "vnni", "uint8", False, "x86 VNNI: exact u8 x s8 int32 accumulation, U8S8 8-bit"
        )
    if "avx2" in flags:
        return IsaChoice(
            "avx2",
            "uint8",
            True,
            "x86 AVX2 without VNNI: VPMADDUBSW saturates int16 pairs, so weights use 7 bits "
            "(reduce_range)",
        )
    return IsaChoice("other", "uint8", False, "no AVX2/VNNI/ARM dot product: ORT defaults (U8S8)")
