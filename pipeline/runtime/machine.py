"""What this machine is: the CPU (model name and feature flags) and where caches go.

Read once per process. The CPU matters to results, not only to speed: int8 kernels differ
with AVX2 / AVX-512 / VNNI, and a kernel-timing verdict measured on one CPU says nothing on
another, so benchmarks record it and the timing store is keyed by it.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cpu:
    model: str  # "AMD EPYC 7B13", or what ``platform`` says without /proc/cpuinfo
    flags: frozenset[str]  # x86 "flags" or ARM "Features" of the first processor

    @property
    def isa(self) -> str:
        """The SIMD level that matters for int8/fp32 kernels, for reports."""
        if "avx512_vnni" in self.flags or "avx_vnni" in self.flags:
            return "AVX-512 VNNI" if "avx512_vnni" in self.flags else "AVX-VNNI"
        if "avx512f" in self.flags:
            return "AVX-512"
        if "avx2" in self.flags:
            return "AVX2"
        return "asimd" if "asimd" in self.flags else "baseline"


@functools.cache
def cpu() -> Cpu:
    """This machine's CPU, from /proc/cpuinfo (first processor); elsewhere ``platform``."""
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "flags", "Features") and name not in found:
                found[name] = value.strip()
    except OSError:
        pass
    model = found.get("model name") or platform.processor() or platform.machine()
    return Cpu(model, frozenset((found.get("flags") or found.get("Features", "")).split()))


def cache_root() -> Path:
    """Where this project keeps caches (timing store, TensorRT engines): ``$OVO_CACHE_DIR``
    or ``~/.cache/onnx-verified-optimizer``; read on every call, tests move it."""
    root = os.environ.get("OVO_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "onnx-verified-optimizer"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and ``taskset``
    narrow), the figure ONNX Runtime's default thread count follows."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 0
