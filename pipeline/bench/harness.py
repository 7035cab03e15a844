"""Benchmark harness: several models side by side, interleaved, with measured noise.

``python optimize.py bench A.onnx B.onnx [--provider ...] [--batch-sizes 1,8,32]``

How it measures, and why:

- **One child process per model.** Each model's session lives in its own worker process, so
  its peak RSS (``VmHWM``) and GPU memory are its own, not the sum of everything loaded so
  far, and one model's allocator arenas cannot slow the other. The parent only hands out
  work; workers take turns, never run at the same time, and time themselves (the pipe is
  outside the timed region).
- **Interleaved rounds.** Each round takes one sample from every model, in forward order on
  even rounds and reversed on odd ones (A B, B A, ...), so slow drift on a shared machine
  hits all models alike. A sample is ``runs_per_sample`` back-to-back runs (enough that a
  sample lasts ``min_sample_seconds``), each run timed on its own for the percentiles.
- **Ratios per round.** For each round, model / baseline (the first model) of the sample
  means; the reported ratio is the median of those. Its noise is the half-width of a
  distribution-free 95% confidence interval of that median (order statistics of the
  binomial), or, when larger, the drift between the medians of four consecutive blocks of
  rounds (a shared machine's load changes during a run: see ``block_drift``). A speedup or
  slowdown is only claimed when ``|ratio - 1| > noise``.
- **Two runs agree** when their ratios are within the sum of their noises (their intervals
  overlap): see ``agree``. ``bench A.onnx A.onnx`` (an A/A run) shows the harness's own
  null: a ratio near 1 within its noise.

The statistics are pure functions of timings, tested on synthetic data.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import providers as providers_mod
from pipeline.runtime import inputs as inputs_mod
from pipeline.runtime import machine
from pipeline.runtime.errors import UserError
from pipeline.runtime.sessions import open_session
from pipeline.runtime.timing import interleaved_rounds, ratio_stats, runs_per_sample

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0"
DEFAULT_SEQUENCE = 128
DEFAULT_SPATIAL = 224
DEFAULT_OTHER = 1


# --------------------------------------------------------------------------- statistics


def latency_summary(run_seconds: Sequence[float], batch: int) -> dict:
    """p50/p90/p99/mean/min latency in ms over single runs, and items per second."""
    times = np.asarray(run_seconds, dtype=float)
    if times.size == 0:
        raise ValueError("no timings")
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    mean = float(times.mean())
    return {
        "runs": int(times.size),
        "p50_ms": float(p50 * 1e3),
        "p90_ms": float(p90 * 1e3),
        "p99_ms": float(p99 * 1e3),
        "mean_ms": mean * 1e3,
        "min_ms": float(times.min() * 1e3),
        "throughput_per_s": batch / mean if mean > 0 else float("inf"),
    }


# --------------------------------------------------------------------------- inputs


def bench_feeds(
    model, batch: int, dims: dict[str, int] | None = None, seed: int = 0
) -> tuple[dict[str, np.ndarray], bool]:
    """Inputs for ``model`` with every batch-like dynamic dim set to ``batch``.

    Other dynamic dims take ``dims[symbol]`` when given, else a size by kind (sequence 128,
    image side 224, anything else 1). Values come from ``pipeline.runtime.inputs`` (ids inside the
    vocabulary, masks with padding). Returns the feeds and whether any batch dim exists.
    """
    dims = dims or {}
    overrides: dict[str, tuple[int, ...]] = {}
    has_batch = False
    for spec in inputs_mod.input_specs(model):
        if spec.shape is None:
            raise UserError(f"input '{spec.name}' has unknown rank; pass --inputs data")
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            if isinstance(dim, str) and dim in dims:
                shape.append(dims[dim])
                continue
            kind, _ = inputs_mod.dynamic_dim_sizes(spec, axis, dim)
            if kind == "batch":
                shape.append(batch)
                has_batch = True
            else:
                shape.append(
                    {"sequence": DEFAULT_SEQUENCE, "spatial": DEFAULT_SPATIAL}.get(
                        kind, DEFAULT_OTHER
                    )
                )
        overrides[spec.name] = tuple(shape)
    feeds = inputs_mod.generate_input_sets(model, overrides, seed=seed, num_sets=1)[0]
    return feeds, has_batch


# --------------------------------------------------------------------------- worker


def _proc_status(field_name: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _worker(conn) -> None:  # pragma: no cover - runs in a child process
    """One model's session; answers the parent's requests until told to stop."""
    import onnxruntime as ort

    from pipeline.runtime.sessions import OPT_LEVELS

    session = None
    feeds: dict = {}
    bindings: dict = {}
    io_binding = False
    device_id = 0
    while True:
        message = conn.recv()
        command = message[0]
        try:
            if command == "init":
                _, path, providers, settings = message
                baseline = _proc_status("VmRSS")
                so = ort.SessionOptions()
                so.graph_optimization_level = OPT_LEVELS[settings["optimization"]]
                so.log_severity_level = 3
                if settings.get("intra_op_threads") is not None:
                    so.intra_op_num_threads = settings["intra_op_threads"]
                if settings.get("inter_op_threads") is not None:
                    so.inter_op_num_threads = settings["inter_op_threads"]
                io_binding = settings.get("io_binding", False)
                device_id = settings.get("device_id", 0)
                start = time.perf_counter()
                session = open_session(path, so, providers)
                created = time.perf_counter() - start
                conn.send(
                    {
                        "session_seconds": created,
                        "rss_baseline_bytes": baseline,
                        "rss_after_session_bytes": _proc_status("VmRSS"),
                        "providers": session.get_providers(),
                        "inputs": [i.name for i in session.get_inputs()],
                        "pid": os.getpid(),
                    }
                )
            elif command == "feeds":
                _, key, arrays = message
                wanted = {i.name for i in session.get_inputs()}
                missing = sorted(wanted - set(arrays))
                if missing:
                    raise ValueError(f"no data for input(s) {', '.join(missing)}")
                feeds[key] = {k: v for k, v in arrays.items() if k in wanted}
                if io_binding:
                    binding = session.io_binding()
                    kept = []
                    for name, array in feeds[key].items():
                        value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", device_id)
                        kept.append(value)
                        binding.bind_ortvalue_input(name, value)
                    for out in session.get_outputs():
                        binding.bind_output(out.name, "cuda", device_id)
                    bindings[key] = (binding, kept)
                conn.send({"ok": True})
            elif command == "sample":
                _, key, runs = message
                times = []
                if io_binding:
                    binding = bindings[key][0]
                    for _ in range(runs):
                        start = time.perf_counter()
                        session.run_with_iobinding(binding)
                        times.append(time.perf_counter() - start)
                else:
                    inputs = feeds[key]
                    for _ in range(runs):
                        start = time.perf_counter()
                        session.run(None, inputs)
                        times.append(time.perf_counter() - start)
                conn.send({"times": times})
            elif command == "placement":
                _, key, providers, optimization, path = message
                placement = providers_mod.node_placement(
                    path, providers, feeds[key], optimization=optimization
                )
                conn.send({"placement": placement})
            elif command == "memory":
                conn.send(
                    {"peak_rss_bytes": _proc_status("VmHWM"), "rss_bytes": _proc_status("VmRSS")}
                )
            elif command == "stop":
                conn.send({"ok": True})
                return
        except Exception as exc:
            conn.send({"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"})


class Worker:
    """The parent's handle on one model's worker process."""

    def __init__(self, label: str, path: Path) -> None:
        self.label = label
        self.path = path
        context = mp.get_context("spawn")  # a clean interpreter: no inherited ORT state
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def ask(self, *message) -> dict:
        self.conn.send(message)
        try:
            reply = self.conn.recv()
        except EOFError:
            self.process.join(5)
            code = self.process.exitcode
            how = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
            raise UserError(f"{self.label}: the benchmark worker died ({how})") from None
        if "error" in reply:
            raise UserError(f"{self.label} ({self.path}): {reply['error']}")
        return reply

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self.ask("stop")
        except (UserError, OSError, BrokenPipeError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


# --------------------------------------------------------------------------- harness


@dataclass
class BenchConfig:
    """What ``optimize.py bench`` was asked to do."""

    models: list[Path]
    batch_sizes: tuple[int, ...] = (1,)
    rounds: int = 20
    warmup: int = 5
    min_sample_seconds: float = 0.02
    inputs_path: Path | None = None
    dims: dict[str, int] = field(default_factory=dict)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    optimization: str = "all"
    provider: providers_mod.ProviderRequest = field(default_factory=providers_mod.ProviderRequest)
    placement: bool | None = None  # None: only for GPU providers
    seed: int = 0


def thread_settings(config: BenchConfig) -> dict:
    """Everything that decides how many threads ONNX Runtime uses, as recorded facts."""
    env = {
        k: os.environ[k]
        for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "ORT_NUM_THREADS")
        if k in os.environ
    }
    return {
        "intra_op_threads": config.intra_op_threads,
        "inter_op_threads": config.inter_op_threads,
        "default_when_none": "ONNX Runtime's default (one per usable core)",
        "env": env,
        "cpu_count": os.cpu_count(),
        "usable_cores": machine.usable_cores(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _model_size(path: Path) -> int:
    from pipeline.load import referenced_data_files

    size = path.stat().st_size
    for name in referenced_data_files(path):
        data = path.parent / name
        size += data.stat().st_size if data.is_file() else 0
    return size


def _labels(paths: Sequence[Path]) -> list[str]:
    labels, seen = [], {}
    for path in paths:
        base = path.stem
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return labels


def gpu_memory_by_pid() -> dict[int, int]:
    """Bytes of GPU memory each process uses (``nvidia-smi``; empty without a GPU)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        done = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    usage = {}
    for line in done.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            usage[int(parts[0])] = int(parts[1]) * 1024 * 1024
    return usage


def run_bench(config: BenchConfig, progress=None) -> dict:
    """Benchmark ``config.models`` side by side; returns the JSON-ready result."""
    import onnx_ir as ir

    from pipeline.load import file_sha256
    from pipeline.report import versions

    say = progress or (lambda text: logger.info(text))
    if not config.models:
        raise UserError("bench needs at least one model")
    for path in config.models:
        if not path.is_file():
            raise UserError(f"model not found: {path}")
    if any(b < 1 for b in config.batch_sizes) or not config.batch_sizes:
        raise UserError("--batch-sizes must be positive integers")
    if config.rounds < 3:
        raise UserError("--rounds must be at least 3")
    resolution = providers_mod.resolve(config.provider)
    say(f"provider: {resolution.reason}")
    first = ir.load(config.models[0])  # external data stays on disk, memory-mapped

    # Input sets: the user's data as-is, or generated once per batch size from model 1.
    cases: list[tuple[str, int, dict]] = []
    notes: list[str] = list(resolution.notes)
    if config.inputs_path is not None:
        for index, feeds in enumerate(inputs_mod.load_user_inputs(config.inputs_path)):
            arrays = [a for a in feeds.values() if np.ndim(a)]
            batch = int(arrays[0].shape[0]) if arrays else 1
            cases.append((f"inputs{index}", batch, feeds))
    else:
        for batch in config.batch_sizes:
            feeds, has_batch = bench_feeds(first, batch, config.dims, config.seed)
            if not has_batch:
                notes.append("the first model has no dynamic batch dimension: batch sizes ignored")
                static = next(iter(feeds.values())) if feeds else None
                size = int(static.shape[0]) if static is not None and static.ndim else 1
                cases = [(f"batch{size}", size, feeds)]
                break
            cases.append((f"batch{batch}", batch, feeds))
    dynamic = providers_mod.dynamic_axes(first)
    del first

    labels = _labels(config.models)
    workers: list[Worker] = []
    models: list[dict] = []
    use_placement = config.placement
    if use_placement is None:
        use_placement = resolution.resolved != "cpu"
    io_binding = resolution.harness_options.get("io_binding") == "True"
    if io_binding and resolution.resolved == "cpu":
        notes.append("io_binding ignored: it binds device memory, and the provider is cpu")
        io_binding = False
    try:
        for label, path in zip(labels, config.models, strict=True):
            own = copy.deepcopy(resolution)
            digest = file_sha256(path)
            providers_mod.finalize_tensorrt(own, digest, [c[2] for c in cases], dynamic)
            session_providers = own.session_providers()
            say(f"{label}: creating a session in a worker process")
            worker = Worker(label, path)
            workers.append(worker)
            info = worker.ask(
                "init",
                str(path),
                session_providers,
                {
                    "optimization": config.optimization,
                    "intra_op_threads": config.intra_op_threads,
                    "inter_op_threads": config.inter_op_threads,
                    "io_binding": io_binding,
                    "device_id": int(config.provider.options.get("device_id", "0")),
                },
            )
            wanted = providers_mod.PROVIDERS[resolution.resolved].ort_name
            if info["providers"][0] != wanted:
                raise UserError(
                    f"{label}: the session got {info['providers'][0]}, not {wanted}, although "
                    "the probe did"
                )
            for key, _, feeds in cases:
                worker.ask("feeds", key, feeds)
            models.append(
                {
                    "label": label,
                    "path": str(path),
                    "size_bytes": _model_size(path),
                    "sha256": digest,
                    "session_seconds": info["session_seconds"],
                    "session_providers": info["providers"],
                    "provider_options": own.options,
                    "rss_baseline_bytes": info["rss_baseline_bytes"],
                    "rss_after_session_bytes": info["rss_after_session_bytes"],
                    "pid": info["pid"],
                }
            )
            if use_placement:
                models[-1]["placement"] = worker.ask(
                    "placement", cases[0][0], session_providers, config.optimization, str(path)
                )["placement"]
        batches = [_measure_case(config, workers, key, batch, say) for key, batch, _ in cases]
        gpu = gpu_memory_by_pid() if resolution.resolved != "cpu" else {}
        for worker, model in zip(workers, models, strict=True):
            memory = worker.ask("memory")
            model["peak_rss_bytes"] = memory["peak_rss_bytes"]
            model["model_rss_bytes"] = memory["peak_rss_bytes"] - model["rss_baseline_bytes"]
            model["gpu_memory_bytes"] = gpu.get(model.pop("pid")) if gpu else None
    finally:
        for worker in workers:
            worker.stop()
    for key, _, feeds in cases:
        for batch in batches:
            if batch["case"] == key:
                batch["inputs"] = {
                    n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in feeds.items()
                }
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "benchmark",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "versions": versions(),
        "config": {
            "models": [str(p) for p in config.models],
            "batch_sizes": list(config.batch_sizes),
            "rounds": config.rounds,
            "warmup": config.warmup,
            "min_sample_seconds": config.min_sample_seconds,
            "optimization": config.optimization,
            "inputs": str(config.inputs_path) if config.inputs_path else "generated",
            "dims": config.dims,
            "seed": config.seed,
        },
        "threads": thread_settings(config),
        "provider": resolution.to_dict(),
        "models": models,
        "batches": batches,
        "notes": notes,
    }


def _measure_case(config: BenchConfig, workers: list[Worker], key: str, batch: int, say) -> dict:
    """Warm up, calibrate, then interleaved rounds for one input case."""
    say(f"{key}: warm-up ({config.warmup} runs per model)")
    singles = []
    for worker in workers:
        times = worker.ask("sample", key, max(1, config.warmup))["times"]
        singles.append(float(np.median(times[-max(1, len(times) // 2) :])))
    runs = runs_per_sample(singles[0], config.min_sample_seconds)
    say(f"{key}: {config.rounds} interleaved rounds x {runs} runs per sample")
    samples = interleaved_rounds(
        [lambda n, w=worker: w.ask("sample", key, n)["times"] for worker in workers],
        config.rounds,
        runs,
    )
    round_means = [[float(np.mean(s)) for s in model] for model in samples]
    latency = {
        worker.label: latency_summary([t for s in model for t in s], batch)
        for worker, model in zip(workers, samples, strict=True)
    }
    comparisons = []
    for index in range(1, len(workers)):
        stats = ratio_stats(round_means[0], round_means[index])
        comparisons.append(
            {"model": workers[index].label, "baseline": workers[0].label, **stats.to_dict()}
        )
    return {
        "case": key,
        "batch": batch,
        "runs_per_sample": runs,
        "latency": latency,
        "round_means_ms": {
            w.label: [m * 1e3 for m in means] for w, means in zip(workers, round_means, strict=True)
        },
        "comparisons": comparisons,
    }


def write_json(result: dict, path: Path) -> None:
    """Write the result atomically (temp file + rename), like report.json."""
    from pipeline.runtime.atomic_write import write_text_atomic
    from pipeline.runtime.compare import to_jsonable

    try:
        write_text_atomic(path, json.dumps(to_jsonable(result), indent=2) + "\n", ".tmp-bench-")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
