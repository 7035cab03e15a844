"""Execution providers for real: probe, resolve, configure, and report where nodes ran.

``onnxruntime-gpu`` lists CUDA and TensorRT in ``get_available_providers()`` on any machine,
GPU or not, and an ``InferenceSession`` asked for CUDA quietly runs on CPU when the CUDA
libraries are missing. So "available" means nothing here: a provider *works* only when a
session created with it reads it back from ``get_providers()``.

Each GPU provider is probed in a child process on a one-node model. A child, because

- ONNX Runtime reports why a provider failed only as a log line on the C++ stderr (e.g.
  ``Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13:
  cannot open shared object file``), which a child's captured stderr gives us verbatim;
- a broken driver or library mix can crash the process that loads it (ORT 1.31.1 on this
  CPU-only image segfaults in ``get_all_opkernel_def()``), and a probe must never take the
  pipeline down with it.

The failure is classified (missing library, no device/driver, version mismatch, bad option)
so the user is told what to install, not just that it failed.

Resolution rules (``--provider``):

- one name (``cuda``): it must work, or the run stops with exit 2 and the reason; with
  ``--allow-fallback`` it runs on CPU and the report records the fallback and why;
- an ordered list (``tensorrt,cuda,cpu``): the first that works, and the report says why each
  earlier one was skipped; if none works, as for one name;
- ``auto``: the list ``tensorrt,cuda,cpu``.

Sessions for a resolved GPU provider list the slower providers after it (TensorRT, CUDA,
CPU), as ONNX Runtime expects: nodes the first cannot take go to the next. That is exactly
what the placement report (from ORT's profiler) makes visible.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.runtime import machine
from pipeline.runtime.errors import UserError

logger = logging.getLogger(__name__)

# Provider options we pass through to ONNX Runtime (documented ones of ORT 1.31), by provider.
CUDA_OPTIONS = frozenset(
    {
        "device_id",
        "cudnn_conv_algo_search",  # EXHAUSTIVE | HEURISTIC | DEFAULT
        "gpu_mem_limit",
        "arena_extend_strategy",
        "do_copy_in_default_stream",
        "cudnn_conv_use_max_workspace",
        "cudnn_conv1d_pad_to_nc1d",
        "enable_cuda_graph",
        "enable_skip_layer_norm_strict_mode",
        "use_tf32",
        "prefer_nhwc",
    }
)
TENSORRT_OPTIONS = frozenset(
    {
        "device_id",
        "trt_fp16_enable",
        "trt_bf16_enable",
        "trt_int8_enable",
        "trt_int8_calibration_table_name",
        "trt_int8_use_native_calibration_table",
        "trt_engine_cache_enable",
        "trt_engine_cache_path",
        "trt_engine_cache_prefix",
        "trt_timing_cache_enable",
        "trt_timing_cache_path",
        "trt_force_timing_cache",
        "trt_max_workspace_size",
        "trt_max_partition_iterations",
        "trt_min_subgraph_size",
        "trt_builder_optimization_level",
        "trt_profile_min_shapes",
        "trt_profile_opt_shapes",
        "trt_profile_max_shapes",
        "trt_dla_enable",
        "trt_dla_core",
        "trt_layer_norm_fp32_fallback",
        "trt_detailed_build_log",
        "trt_cuda_graph_enable",
        "trt_dump_subgraphs",
        "trt_sparsity_enable",  # TensorRT may use its 2:4 sparse kernels (flag_sparse_weights)
    }
)


@dataclass(frozen=True)
class Provider:
    """Everything the project knows about one execution provider, in one row.

    Adding a provider is adding a row: the CLI, the graph target, quantization and sessions
    read these fields, never the provider's name.
    """

    name: str  # what users type: cpu | cuda | tensorrt
    ort_name: str
    # The session's providers, in order: nodes the first cannot take fall to the next.
    chain: tuple[str, ...]
    options: frozenset[str]  # ONNX Runtime provider options passed through
    # The graph target this provider needs whatever the recipe says (TensorRT parses
    # standard ONNX only), or None.
    required_target: str | None
    # The target that replaces the default ``cpu`` one (CUDA: only ops with a CUDA kernel).
    default_target: str
    quantization_device: str  # cpu | cuda: which quantization kernels will run the model
    gpu: bool
    target_note: str = ""  # why the target changes, for the report


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("cpu", "CPUExecutionProvider", ("cpu",), frozenset(), None, "cpu", "cpu", False),
        Provider(
            "cuda",
            "CUDAExecutionProvider",
            ("cuda", "cpu"),
            CUDA_OPTIONS,
            None,
            "cuda",
            "cuda",
            True,
            "fusions emit only ops with a CUDA kernel",
        ),
        Provider(
            "tensorrt",
            "TensorrtExecutionProvider",
            ("tensorrt", "cuda", "cpu"),
            TENSORRT_OPTIONS,
            "portable",
            "portable",
            "cuda",
            True,
            "TensorRT takes standard ONNX ops only",
        ),
    )
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")  # --provider auto: the first that works

# Ours, not ORT's: used by this project, never handed to a session.
HARNESS_OPTIONS = frozenset(
    {
        "io_binding",  # benchmark with inputs/outputs bound on the device (CUDA, TensorRT)
        "cache_dir",  # root of the TensorRT engine/timing caches
    }
)
_BOOL_OPTIONS = frozenset(
    {
        "do_copy_in_default_stream",
        "cudnn_conv_use_max_workspace",
        "cudnn_conv1d_pad_to_nc1d",
        "enable_cuda_graph",
        "enable_skip_layer_norm_strict_mode",
        "use_tf32",
        "prefer_nhwc",
        "io_binding",
    }
    | {k for k in TENSORRT_OPTIONS if k.endswith("_enable") or k.startswith("trt_force")}
    | {"trt_int8_use_native_calibration_table", "trt_layer_norm_fp32_fallback"}
    | {"trt_detailed_build_log", "trt_dump_subgraphs"}
)
_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
DEFAULT_TRT_WORKSPACE = str(4 << 30)  # 4 GiB, ORT's own default is the device's memory

PROBE_TIMEOUT_S = 180.0  # a TensorRT probe builds an engine; CUDA context creation is slow


# --------------------------------------------------------------------------- requests


class ProviderUnavailable(UserError):
    """None of the requested providers works here (exit 2); carries every probe."""

    def __init__(self, message: str, request: ProviderRequest, probes: list[Probe]) -> None:
        super().__init__(message)
        self.request = request
        self.probes = probes

    def to_dict(self) -> dict:
        """The report's ``provider`` section for a run that stopped here."""
        return {
            "requested": list(self.request.names),
            "mode": self.request.mode,
            "resolved": None,
            "fallback": False,
            "reason": str(self),
            "allow_fallback": self.request.allow_fallback,
            "probes": [p.to_dict() for p in self.probes],
        }


@dataclass(frozen=True)
class ProviderRequest:
    """What the user asked for: ``--provider``, ``--allow-fallback``, ``--provider-option``."""

    text: str = "cpu"
    allow_fallback: bool = False
    options: dict[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "auto" if self.text.strip().lower() == "auto" else "list"

    @property
    def names(self) -> tuple[str, ...]:
        return parse_provider_list(self.text)


def parse_provider_list(text: str) -> tuple[str, ...]:
    """``cpu`` | ``cuda`` | ``tensorrt`` | ``auto`` | ``tensorrt,cuda,cpu`` -> short names."""
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    if parts == ["auto"]:
        return AUTO_ORDER
    aliases = {"trt": "tensorrt", "gpu": "cuda"}
    names = tuple(aliases.get(p, p) for p in parts)
    bad = [p for p in names if p not in PROVIDERS]
    if not names or bad:
        raise UserError(
            f"--provider expects cpu, cuda, tensorrt, auto or a comma list of them, got '{text}'"
        )
    if len(set(names)) != len(names):
        raise UserError(f"--provider lists a provider twice: '{text}'")
    return names


def parse_provider_options(texts: Sequence[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings -> options; unknown keys and malformed values are UserErrors.

    Booleans are normalized to ``True``/``False`` (what ONNX Runtime's parser expects), so
    ``trt_fp16_enable=1`` and ``trt_fp16_enable=true`` mean the same and read the same in the
    report.
    """
    known = frozenset().union(*(p.options for p in PROVIDERS.values())) | HARNESS_OPTIONS
    options: dict[str, str] = {}
    for text in texts or []:
        key, sep, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UserError(f"--provider-option expects KEY=VALUE, got '{text}'")
        if key not in known:
            raise UserError(
                f"--provider-option: unknown key '{key}'; known: {', '.join(sorted(known))}"
            )
        if key in _BOOL_OPTIONS:
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise UserError(f"--provider-option {key} expects a boolean, got '{value}'")
            value = "True" if low in ("1", "true", "yes", "on") else "False"
        elif key == "cudnn_conv_algo_search":
            value = value.upper()
            if value not in _ALGO_SEARCH:
                raise UserError(f"--provider-option {key} expects one of {', '.join(_ALGO_SEARCH)}")
        elif key in ("device_id", "trt_max_workspace_size", "gpu_mem_limit", "trt_dla_core"):
            if not value.isdigit():
                raise UserError(f"--provider-option {key} expects a non-negative integer")
        options[key] = value
    return options


def options_for(provider: str, options: dict[str, str]) -> dict[str, str]:
    """The subset of the user's options that ONNX Runtime's ``provider`` takes."""
    return {k: v for k, v in options.items() if k in PROVIDERS[provider].options}


# --------------------------------------------------------------------------- probing


@dataclass
class Probe:
    """Whether one provider works here, and if not, why."""

    provider: str  # short name
    ok: bool
    kind: str  # ok | missing_library | no_device | version_mismatch | bad_option | crashed ...
    reason: str
    seconds: float = 0.0
    libraries: dict[str, str] = field(default_factory=dict)  # soname -> loaded file
    log: list[str] = field(default_factory=list)  # ONNX Runtime's error/warning lines

    def to_dict(self) -> dict:
        return asdict(self)


# Runs in a child: a one-node model, a session with the provider, providers read back. Only
# onnx and onnxruntime are imported, so a probe costs well under a second when it fails.
_PROBE_SCRIPT = r"""
import json, os, sys
import onnx.helper as h
import onnxruntime as ort
name, options = sys.argv[1], json.loads(sys.argv[2])
graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "probe",
    [h.make_tensor_value_info("x", 1, [1, 4])], [h.make_tensor_value_info("y", 1, [1, 4])])
model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
model.ir_version = 8
result = {"available": name in ort.get_available_providers(), "providers": [], "error": ""}
if result["available"]:
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 2
        from pipeline.runtime.sessions import open_session
        session = open_session(model.SerializeToString(), so,
                               providers=[(name, options), "CPUExecutionProvider"])
        result["providers"] = session.get_providers()
        import numpy as np
        session.run(None, {"x": np.ones((1, 4), np.float32)})
    except Exception as exc:
        result["error"] = " ".join(str(exc).split())[:600]
libs = {}
try:
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if line.count("/") else ""
            base = os.path.basename(path)
            for key in ("libnvinfer.so", "libcudart.so", "libcudnn.so", "libcublas.so",
                        "libcuda.so"):
                if base.startswith(key):
                    libs[base] = os.path.realpath(path)
except OSError:
    pass
result["libraries"] = libs
sys.stdout.write("\n@@PROBE@@" + json.dumps(result) + "\n")
"""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOAD_FAIL = re.compile(
    r"Failed to load library (?P<lib>\S+) with error: (?P<dep>[^:\s]+): (?P<what>[^\n\[]+)"
)
_REQUIRE = re.compile(r"Require (cuDNN \d+(?:\.[\d*]+)* and CUDA \d+(?:\.[\d*]+)*)")
_NO_DEVICE = re.compile(
    r"no CUDA-capable device|cudaErrorNoDevice|CUDA failure 100\b|CUDA error 100\b", re.I
)
_OLD_DRIVER = re.compile(
    r"driver version is insufficient|cudaErrorInsufficientDriver|CUDA failure 35\b", re.I
)
_MISMATCH = re.compile(r"undefined symbol: (\S+)|version `([^']+)' not found")
_BAD_OPTION = re.compile(r"(Invalid|Unknown|unknown) (value|option|provider option)[^\n]*", re.I)


def classify_failure(log: str, error: str, available: bool, provider: str) -> tuple[str, str]:
    """Turn ONNX Runtime's stderr (and any exception text) into (kind, one-line reason).

    Pure, so every message we have seen is table-tested. Kinds: ``not_in_build`` (this
    onnxruntime wheel has no such provider), ``no_device`` (no NVIDIA driver or GPU),
    ``missing_library`` (a CUDA / cuDNN / TensorRT library cannot be found),
    ``version_mismatch`` (a library or driver of the wrong version), ``bad_option`` (the
    provider rejected an option), ``unknown`` (the first error line, verbatim).
    """
    text = _ANSI.sub("", log) + "\n" + error
    ort_name = PROVIDERS[provider].ort_name
    if not available:
        return "not_in_build", (
            f"this onnxruntime build has no {ort_name} (install onnxruntime-gpu for CUDA/TensorRT)"
        )
    requirement = _REQUIRE.search(text)
    need = f"; this onnxruntime needs {requirement.group(1)}" if requirement else ""
    if _NO_DEVICE.search(text):
        return "no_device", f"no CUDA-capable GPU is visible{need}"
    if _OLD_DRIVER.search(text):
        return "version_mismatch", f"the NVIDIA driver is too old for this CUDA runtime{need}"
    if match := _LOAD_FAIL.search(text):
        lib, dep = Path(match["lib"]).name, match["dep"]
        if "cannot open shared object file" in match["what"]:
            if dep.startswith("libcuda.so"):
                return "no_device", f"{lib} needs {dep}: no NVIDIA driver is installed"
            others = find_other_versions(dep)
            if others:
                return "version_mismatch", (
                    f"{lib} needs {dep}, but only {', '.join(others)} is installed{need}"
                )
            return "missing_library", f"{lib} cannot load: {dep} is not installed{need}"
        if mismatch := _MISMATCH.search(match["what"]):
            return "version_mismatch", f"{lib}: {dep} is the wrong version ({mismatch[0]}){need}"
        return "missing_library", f"{lib} cannot load: {dep}: {match['what'].strip()}{need}"
    if mismatch := _MISMATCH.search(text):
        return "version_mismatch", f"a library is the wrong version ({mismatch[0]}){need}"
    if bad := _BAD_OPTION.search(text):
        return "bad_option", bad[0].strip()
    if "Please install TensorRT libraries" in text:
        return "missing_library", f"the TensorRT libraries (libnvinfer) are not installed{need}"
    first = next((ln for ln in text.splitlines() if "[E:" in ln or "rror" in ln), "")
    first = re.sub(r"^.*?\] ", "", first).strip()
    return "unknown", (first or f"a session with {ort_name} fell back to CPU") + need


def find_other_versions(soname: str) -> list[str]:
    """Other installed versions of a shared library (``libcublasLt.so.12`` for ``.so.13``).

    Looks where the dynamic loader and NVIDIA's pip wheels put them; a hit turns "missing"
    into the more useful "wrong version".
    """
    base = soname.split(".so")[0] + ".so"
    found: set[str] = set()
    try:
        listing = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    for line in listing.splitlines():
        name = line.strip().split(" ", 1)[0]
        if name.startswith(base + ".") and name != soname:
            found.add(name)
    folders = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            folders.extend(str(p) for p in nvidia.glob("*/lib"))
    for folder in folders:
        for path in Path(folder).glob(base + ".*"):
            if path.name != soname and re.fullmatch(re.escape(base) + r"\.\d+", path.name):
                found.add(path.name)
    return sorted(found)


def probe(provider: str, options: dict[str, str] | None = None) -> Probe:
    """Does ``provider`` work here? CPU is asked in-process; GPU providers in a child."""
    return _probe_cached(provider, json.dumps(options or {}, sort_keys=True))


@functools.cache
def _probe_cached(provider: str, options_json: str) -> Probe:
    start = time.perf_counter()
    if provider == "cpu":
        return Probe("cpu", True, "ok", "the CPU provider is always built in", 0.0)
    ort_name = PROVIDERS[provider].ort_name
    env = dict(os.environ, ORT_LOGGING_LEVEL="2")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT, ort_name, options_json],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Probe(
            provider,
            False,
            "timeout",
            f"creating a {ort_name} session did not finish in {PROBE_TIMEOUT_S:.0f} s",
            time.perf_counter() - start,
        )
    seconds = time.perf_counter() - start
    log_lines = [
        _ANSI.sub("", ln).strip()
        for ln in (done.stderr + "\n" + done.stdout).splitlines()
        if re.search(r"\[(E|W|F):onnxruntime|EP Error|rror", ln) and "@@PROBE@@" not in ln
    ][:20]
    marker = done.stdout.rfind("@@PROBE@@")
    if done.returncode != 0 or marker < 0:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        kind, why = classify_failure(done.stderr, "", True, provider)
        reason = f"the probe process crashed ({how}) creating a {ort_name} session"
        if kind != "unknown":
            reason += f": {why}"
        return Probe(provider, False, "crashed", reason, seconds, log=log_lines)
    result = json.loads(done.stdout[marker + len("@@PROBE@@") :].strip())
    libraries = result.get("libraries", {})
    if ort_name in result["providers"]:
        return Probe(provider, True, "ok", f"a session read back {ort_name}", seconds, libraries)
    kind, reason = classify_failure(
        done.stderr + "\n" + done.stdout, result["error"], result["available"], provider
    )
    return Probe(provider, False, kind, reason, seconds, libraries, log_lines)


# --------------------------------------------------------------------------- resolution


@dataclass
class Resolution:
    """The provider a run uses, why, and with which options (the report's ``provider``)."""

    requested: list[str]
    mode: str  # list | auto
    resolved: str  # short name
    fallback: bool  # True when the first requested provider is not the one used
    reason: str
    allow_fallback: bool
    probes: list[Probe]
    options: dict[str, dict[str, str]] = field(default_factory=dict)  # ORT name -> options
    harness_options: dict[str, str] = field(default_factory=dict)
    gpu_name: str = ""
    placement: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def chain(self) -> tuple[str, ...]:
        return PROVIDERS[self.resolved].chain

    def session_providers(self) -> list[str | tuple[str, dict[str, str]]]:
        """The ``providers=`` argument for an InferenceSession on the resolved provider."""
        out: list[str | tuple[str, dict[str, str]]] = []
        for short in self.chain:
            name = PROVIDERS[short].ort_name
            opts = self.options.get(name)
            out.append((name, dict(opts)) if opts else name)
        return out

    def to_dict(self) -> dict:
        data = asdict(self)
        data["session_providers"] = [PROVIDERS[s].ort_name for s in self.chain]
        return data


Prober = Callable[[str, dict[str, str]], Probe]


def resolve(request: ProviderRequest, prober: Prober | None = None) -> Resolution:
    """Pick the provider to use, probing each candidate for real, in order.

    Raises:
        UserError: none of the requested providers works and ``allow_fallback`` is off; the
            message carries every probe's reason.
    """
    prober = prober or probe
    names = request.names
    probes: list[Probe] = []
    chosen = None
    for name in names:
        result = prober(name, options_for(name, request.options))
        probes.append(result)
        if result.ok:
            chosen = name
            break
    failed = [p for p in probes if not p.ok]
    why_not = "; ".join(f"{p.provider}: {p.reason}" for p in failed)
    fallback = False
    if chosen is None:
        if not request.allow_fallback:
            asked = "--provider " + request.text
            raise ProviderUnavailable(
                f"{asked} cannot run here: {why_not}. Use --provider cpu, or add "
                "--allow-fallback to run on CPU and record the fallback in the report",
                request,
                probes,
            )
        cpu = prober("cpu", {})
        probes.append(cpu)
        chosen, fallback = "cpu", True
        reason = f"fell back to cpu (--allow-fallback): {why_not}"
    elif failed:
        fallback = request.mode != "auto"
        order = " > ".join(names)
        label = f"auto ({order})" if request.mode == "auto" else f"--provider {request.text}"
        reason = f"{label} picked {chosen}, the first that works here; skipped {why_not}"
    elif request.mode == "auto":
        reason = f"auto picked {chosen}: the fastest provider that works here"
    else:
        reason = f"{chosen} was requested and works ({probes[-1].reason})"
    harness = {k: v for k, v in request.options.items() if k in HARNESS_OPTIONS}
    options = {
        PROVIDERS[s].ort_name: options_for(s, request.options)
        for s in PROVIDERS[chosen].chain
        if options_for(s, request.options)
    }
    resolution = Resolution(
        requested=list(names),
        mode=request.mode,
        resolved=chosen,
        fallback=fallback,
        reason=reason,
        allow_fallback=request.allow_fallback,
        probes=probes,
        options=options,
        harness_options=harness,
    )
    unused = sorted(set(request.options) - set(harness) - _used_keys(resolution))
    if unused:
        resolution.notes.append(
            f"provider option(s) {', '.join(unused)} ignored: they are not options of "
            f"{', '.join(PROVIDERS[s].ort_name for s in resolution.chain)}"
        )
    if PROVIDERS[chosen].gpu:
        resolution.gpu_name = gpu_name(int(request.options.get("device_id", "0")))
    logger.info("provider: %s", reason)
    return resolution


def _used_keys(resolution: Resolution) -> set[str]:
    return {k for opts in resolution.options.values() for k in opts}


def target_for(resolved: str, target: str) -> tuple[str, str]:
    """The graph target a provider needs, and a note when it differs from ``target``.

    TensorRT's parser takes standard ONNX only, so a TensorRT run always gets the portable
    graph (never contrib ops). A CUDA run on the default ``cpu`` target gets ``cuda``: contrib
    ops that only have a CPU kernel would otherwise pull nodes back to the CPU.
    """
    provider = PROVIDERS[resolved]
    if provider.required_target and target != provider.required_target:
        note = f"target {target} -> {provider.required_target}: {provider.target_note}"
        return provider.required_target, note
    if target == "cpu" and provider.default_target != "cpu":
        return provider.default_target, (
            f"target cpu -> {provider.default_target}: {provider.target_note}"
        )
    return target, ""


def quantization_device(provider_text: str) -> str:
    """Which quantization kernels the first provider of ``--provider`` runs (cpu | cuda)."""
    return PROVIDERS[parse_provider_list(provider_text)[0]].quantization_device


def required_target(provider_text: str) -> str | None:
    """The graph target the first provider of ``--provider`` insists on, if any."""
    return PROVIDERS[parse_provider_list(provider_text)[0]].required_target


def gpu_name(device_id: int = 0) -> str:
    """The GPU's name from ``nvidia-smi`` ("" when there is none or it cannot tell)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ""
    try:
        done = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader", f"--id={device_id}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else ""


# --------------------------------------------------------------------------- TensorRT setup


def tensorrt_version(probes: Sequence[Probe]) -> str:
    """TensorRT's version from the libnvinfer the probe loaded (``libnvinfer.so.10.9.0``)."""
    for p in probes:
        for soname, real in p.libraries.items():
            if soname.startswith("libnvinfer.so"):
                match = re.search(r"libnvinfer\.so\.([\d.]+)", Path(real).name)
                return match.group(1) if match else soname.rsplit(".so.", 1)[-1]
    return "unknown"


def tensorrt_cache_dir(model_sha256: str, trt_version: str, gpu: str, root: Path) -> Path:
    """A cache folder per (model, TensorRT version, GPU): an engine built for one of them is
    wrong for the others, and TensorRT does not always notice."""
    safe_gpu = re.sub(r"[^A-Za-z0-9._-]+", "-", gpu or "unknown-gpu").strip("-")
    return root / "tensorrt" / f"{model_sha256[:16]}-trt{trt_version}-{safe_gpu}"


def profile_shapes(
    feed_sets: Sequence[dict[str, np.ndarray]], dynamic: dict[str, Sequence[bool]]
) -> dict[str, str]:
    """TensorRT optimization profile (min/opt/max) from the shapes the model will see.

    Only inputs with a dynamic dimension get a profile (TensorRT needs none for static
    ones). On a dynamic axis, min is 1, opt the first set's size and max the largest size
    seen; static axes keep their size. Pure, so it is tested without a GPU.

    Args:
        feed_sets: input sets the model will be run on (verification or benchmark inputs).
        dynamic: per input name, which axes the model declares dynamic.
    """
    mins, opts, maxs = [], [], []
    for name, axes in dynamic.items():
        if not any(axes) or not feed_sets or name not in feed_sets[0]:
            continue
        shapes = [tuple(s[name].shape) for s in feed_sets if name in s]
        first = shapes[0]
        biggest = tuple(max(sh[a] for sh in shapes) for a in range(len(first)))
        lo = tuple(1 if axes[a] else first[a] for a in range(len(first)))
        mins.append(f"{name}:{'x'.join(map(str, lo))}")
        opts.append(f"{name}:{'x'.join(map(str, first))}")
        maxs.append(f"{name}:{'x'.join(map(str, biggest))}")
    if not mins:
        return {}
    return {
        "trt_profile_min_shapes": ",".join(mins),
        "trt_profile_opt_shapes": ",".join(opts),
        "trt_profile_max_shapes": ",".join(maxs),
    }


def finalize_tensorrt(
    resolution: Resolution,
    model_bytes_sha256: str,
    feed_sets: Sequence[dict[str, np.ndarray]],
    dynamic: dict[str, Sequence[bool]],
) -> None:
    """Fill in the TensorRT options that depend on the model: caches, profiles, workspace.

    The user's own values always win; only missing ones are derived. An int8 calibration
    table given as a path is copied into the engine cache folder, where ORT looks it up by
    file name.
    """
    if resolution.resolved != "tensorrt":
        return
    name = PROVIDERS["tensorrt"].ort_name
    opts = resolution.options.setdefault(name, {})
    root = Path(resolution.harness_options.get("cache_dir") or machine.cache_root())
    version = tensorrt_version(resolution.probes)
    cache = tensorrt_cache_dir(model_bytes_sha256, version, resolution.gpu_name, root)
    opts.setdefault("trt_engine_cache_enable", "True")
    opts.setdefault("trt_engine_cache_path", str(cache))
    opts.setdefault("trt_timing_cache_enable", "True")
    opts.setdefault("trt_timing_cache_path", str(cache))
    opts.setdefault("trt_max_workspace_size", DEFAULT_TRT_WORKSPACE)
    if not any(k.startswith("trt_profile_") for k in opts):
        opts.update(profile_shapes(feed_sets, dynamic))
    if opts.get("trt_int8_enable") == "True":
        table = opts.get("trt_int8_calibration_table_name")
        if not table:
            resolution.notes.append(
                "trt_int8_enable without trt_int8_calibration_table_name: TensorRT needs a "
                "calibration table or a QDQ-quantized model for int8"
            )
        elif Path(table).is_file():
            Path(opts["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
            shutil.copy2(table, Path(opts["trt_engine_cache_path"]) / Path(table).name)
            opts["trt_int8_calibration_table_name"] = Path(table).name
    if opts.get("trt_engine_cache_enable") == "True":
        Path(opts["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        Path(opts["trt_timing_cache_path"]).mkdir(parents=True, exist_ok=True)


def flag_sparse_weights(resolution: Resolution) -> str:
    """Tell the resolved provider that the model's weights hold the 2:4 pattern
    (``--prune sparse=2:4``); returns the note for the report.

    TensorRT picks its sparse kernels only when the builder may (ORT's provider option
    ``trt_sparsity_enable``, TensorRT's ``kSPARSE_WEIGHTS``, ``trtexec --sparsity``) and
    only for fp16 or int8 layers; a user's own ``trt_sparsity_enable`` wins. Every other
    provider runs the zeros through dense kernels.
    """
    if resolution.resolved != "tensorrt":
        return (
            f"prune sparse=2:4: no speed-up on {resolution.resolved}: its kernels are dense, "
            "so the zeros are multiplied like any weight; the model is only smaller once "
            "compressed (zip); TensorRT (--provider tensorrt) has sparse kernels"
        )
    opts = resolution.options.setdefault(PROVIDERS["tensorrt"].ort_name, {})
    if opts.setdefault("trt_sparsity_enable", "True") != "True":
        return (
            "prune sparse=2:4: trt_sparsity_enable=False was given, so TensorRT will not "
            "use its sparse kernels"
        )
    note = "prune sparse=2:4: trt_sparsity_enable=True: TensorRT may pick its sparse kernels"
    if "True" not in (opts.get("trt_fp16_enable"), opts.get("trt_int8_enable")):
        note += " (for fp16 or int8 layers only: add trt_fp16_enable=1)"
    return note + "; the speed-up is not measured by this stage's CPU latency"


def dynamic_axes(model) -> dict[str, list[bool]]:
    """Per graph input of an onnx_ir model, which axes are not fixed integers."""
    out = {}
    for value in model.graph.inputs:
        if value.const_value is not None or value.shape is None:
            continue
        out[value.name] = [not isinstance(d, int) for d in value.shape]
    return out


# --------------------------------------------------------------------------- placement


def summarize_profile(events: Sequence[dict]) -> dict:
    """Node placement from ONNX Runtime profiler events: per provider, nodes and op types.

    Each executed node appears as a ``cat: Node`` event named ``<node>_kernel_time`` whose
    ``args.provider`` is the provider that ran it. A TensorRT or CUDA-graph partition shows
    as one fused node (op type ``TRTKernel_...``), so "1 node on TensorRT" means the whole
    graph went to one engine. Nodes that never ran (an untaken If branch) are not seen.
    """
    seen: dict[str, tuple[str, str]] = {}
    for event in events:
        if event.get("cat") != "Node":
            continue
        args = event.get("args") or {}
        provider = args.get("provider")
        if not provider:
            continue
        name = str(event.get("name", ""))
        for suffix in ("_kernel_time", "_fence_before", "_fence_after"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        op = str(args.get("op_name", "?"))
        if op.startswith("TRTKernel_"):
            op = "TRTKernel"
        seen[name] = (provider, op)
    by_provider: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for provider, op in seen.values():
        by_provider[provider][op] += 1
    total = len(seen)
    return {
        "nodes": total,
        "by_provider": {
            provider: {
                "nodes": sum(ops.values()),
                "share": round(sum(ops.values()) / total, 4) if total else 0.0,
                "op_types": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
            }
            for provider, ops in sorted(by_provider.items())
        },
    }


def node_placement(
    model: str | bytes,
    providers: Sequence[str | tuple[str, dict[str, str]]],
    feeds: dict[str, np.ndarray],
    *,
    optimization: str = "all",
) -> dict:
    """Run ``model`` once with ORT's profiler on and report where each node ran."""
    import onnxruntime as ort

    from pipeline.runtime.sessions import OPT_LEVELS, open_session

    folder = tempfile.mkdtemp(prefix="ovo-profile-")
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = OPT_LEVELS[optimization]
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(folder) / "profile")
        session = open_session(model, so, list(providers))
        wanted = {i.name for i in session.get_inputs()}
        session.run(None, {k: v for k, v in feeds.items() if k in wanted})
        path = session.end_profiling()
        with open(path, encoding="utf-8") as handle:
            events = json.load(handle)
        summary = summarize_profile(events)
        summary["session_providers"] = session.get_providers()
        summary["optimization"] = optimization
        return summary
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- pipeline stage


def check_on_provider(
    model,
    resolution: Resolution,
    input_sets: Sequence[dict[str, np.ndarray]],
    reference: Sequence[dict] | None,
    tolerance,
    overrides: dict | None = None,
) -> dict:
    """Run the optimized model on the resolved provider: parity against the reference
    outputs (computed on CPU at ORT_DISABLE_ALL) and node placement.

    Returns the ``provider.check`` part of the report. A CPU resolution needs no second run:
    the verifier already ran it there, and every node is on the only provider listed.
    """
    from pipeline.runtime import opaque_types
    from pipeline.runtime import sessions as runners
    from pipeline.runtime.compare import compare_sets

    if resolution.resolved == "cpu":
        resolution.placement = {
            "nodes": None,
            "by_provider": {"CPUExecutionProvider": "all"},
            "measured": False,
            "why": "CPUExecutionProvider is the only provider in the session",
        }
        return {"ran": False}
    if reference is None:  # checker-only run: the original cannot run, nothing to compare
        return {"ran": False, "why": "the original model cannot run on ONNX Runtime"}
    serialized = opaque_types.to_proto(model).SerializeToString()
    finalize_tensorrt(resolution, sha256_bytes(serialized), input_sets, dynamic_axes(model))
    session_providers = resolution.session_providers()
    session = runners.create_session(
        model,
        optimization="all",
        providers=session_providers,  # type: ignore[arg-type]
    )
    got = session.inner.get_providers()
    wanted = PROVIDERS[resolution.resolved].ort_name
    if got[0] != wanted:
        raise UserError(
            f"a session for the optimized model did not get {wanted} "
            f"(it got {', '.join(got)}), although the probe did"
        )
    outputs = runners.run_all(session, list(input_sets))
    check: dict = {"ran": True, "session_seconds": session.create_seconds}
    comparison = compare_sets(list(reference), outputs, tolerance, overrides or {})
    check["parity"] = comparison.to_dict()
    check["passed"] = comparison.passed
    check["summary"] = "" if comparison.passed else comparison.summary()
    if runners.has_external_tensors(model):
        with runners.model_on_disk(model) as path:
            resolution.placement = node_placement(str(path), session_providers, input_sets[0])
    else:
        resolution.placement = node_placement(serialized, session_providers, input_sets[0])
    return check
