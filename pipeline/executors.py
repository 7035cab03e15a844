"""Where the per-model work of the zoo jobs runs: in this process, in local worker processes
or as Ray tasks. The one place that knows: ``models/batch.py`` exports with it and
``pipeline/ci_gate.py`` exports and optimizes with it.

A job hands over :class:`Work` items: a name, a plain top-level function with its arguments
(pickled by reference, so a worker imports the same installed code) and what one run asks
of a machine (CPUs, memory). The function must not raise for a model's failure; it returns a
failure record. What the executor handles is what the function cannot: a worker that dies
(a segfault, an OOM kill, a lost node). Such an item is run again, at most ``retries`` times,
and every lost attempt is recorded, so a retry is never silent.

Arguments and results are small (file paths and records), never model bytes: the worker reads
and writes the model on storage every worker sees (one machine: its disk; a cluster: a shared
filesystem mounted at the same path on every node), so a large model never travels through
Ray's object store or the driver's memory.

Every item comes back with where it ran, which the jobs store with the model's record::

    {"executor": "local" | "ray", "node": hostname | null, "node_id": Ray node id | null,
     "task_id": Ray task id | null, "pid": worker pid | null, "attempts": int,
     "lost_attempts": ["WorkerCrashedError: ...", ...]}   # one line per attempt that died

``node``, ``pid`` and the ids are null when no attempt finished (then ``Outcome.error`` says
why). Ray's own ``max_retries`` is left at 0 and the driver resubmits instead: Ray's retries
are invisible to the caller, and the results must say that a model was retried and why.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import os
import socket
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

from pipeline.runtime.errors import UserError

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
DEFAULT_RETRIES = 2
RAY_MISSING = "ray is not installed: pip install 'onnx-verified-optimizer[ray]'"
# What a task asks Ray to reserve: a fixed share for Python, ONNX Runtime and torch, plus a
# multiple of the model's size (the loaded model, the original and the candidate sessions,
# the pass manager's copies). Ray schedules by it; it does not cap what a task uses.
BASE_MEMORY = 1 << 30
MEMORY_PER_MODEL_BYTE = 5
CONNECT_TIMEOUT_S = 10.0


def one_line(exc: BaseException) -> str:
    """``ExcType: message`` on one line, at most 500 characters (for records and summaries)."""
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"[:500]


def memory_request(model_bytes: int | None) -> int:
    """Bytes a task on a model of ``model_bytes`` (None: not known yet) asks Ray to reserve."""
    return BASE_MEMORY + MEMORY_PER_MODEL_BYTE * (model_bytes or 0)


@dataclasses.dataclass(frozen=True)
class Work:
    """One model's work: ``fn(*args)``, run where the executor puts it.

    ``fn`` is a module-level function (the spawn pool and Ray pickle it by name) that never
    raises for a model's failure; ``args`` are picklable and small (paths, not bytes).
    """

    name: str
    fn: Callable[..., object]
    args: tuple
    cpus: float = 1.0
    memory: int = BASE_MEMORY


@dataclasses.dataclass
class Outcome:
    """What became of one :class:`Work`: the function's return value, or why there is none."""

    value: object | None
    placement: dict
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Executor:
    """Where work runs. ``workers`` is for ``local`` (1 = in this process, the simplest to
    debug; more = that many spawned processes); ``address`` is for ``ray`` (None starts a
    local cluster, or joins the one ``ray start`` left on this machine)."""

    kind: str = "local"
    workers: int = 1
    address: str | None = None
    retries: int = DEFAULT_RETRIES

    @property
    def in_process(self) -> bool:
        """True when the work runs in this very process (it then shares its threads)."""
        return self.kind == "local" and self.workers <= 1

    def run(self, items: list[Work], on_done: Callable[[Work, Outcome], None]) -> None:
        """Run every item; call ``on_done`` as each finishes (in this process, in finish order)."""
        if not items:  # everything up to date: no pool to start, no cluster to join
            return
        if self.kind == "ray":
            connect(self.address)
            _run_ray(items, self.retries, on_done)
        elif self.in_process:
            for item in items:
                value, where = _call(item.fn, item.args, "local")
                on_done(item, Outcome(value, _placement(where)))
        else:
            _run_pool(items, self.workers, self.retries, on_done)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The executor flags, the same for both jobs."""
    parser.add_argument(
        "--executor", choices=EXECUTORS, default="local", help="where per-model work runs"
    )
    parser.add_argument(
        "--address",
        help="Ray cluster to join, HOST:PORT or ray://HOST:PORT (with --executor ray; "
        "default: start a local cluster)",
    )
    parser.add_argument(
        "--retries",
        type=_non_negative,
        default=DEFAULT_RETRIES,
        help=f"runs again after a worker dies, per model (default {DEFAULT_RETRIES})",
    )


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def from_args(args: argparse.Namespace, workers: int = 1) -> Executor:
    """The :class:`Executor` the flags of :func:`add_arguments` ask for (see :func:`make`)."""
    return make(args.executor, workers, args.address, args.retries)


def make(
    kind: str, workers: int = 1, address: str | None = None, retries: int = DEFAULT_RETRIES
) -> Executor:
    """A checked :class:`Executor`, connected to its cluster when Ray: a job calls this before
    any work, so a bad choice or an unreachable cluster costs nothing and writes nothing.

    Raises:
        UserError: an unknown kind; ``address`` without Ray; Ray not installed or not reachable.
    """
    if kind not in EXECUTORS:
        raise UserError(f"unknown executor {kind!r} (choose {' or '.join(EXECUTORS)})")
    if address and kind != "ray":
        raise UserError("--address needs --executor ray")
    if kind == "ray":
        connect(address)
    return Executor(kind, workers, address, retries)


def connect(address: str | None) -> None:
    """Join (or start) the Ray cluster before any work, or fail with one clear line.

    A Ray already initialized in this process (a test's cluster, the job's export step) is
    used as it is. A concrete address is tried with a plain TCP connection first: Ray itself
    retries an unreachable address for minutes before it gives up.
    """
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    if ray.is_initialized():
        return
    if address and address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"at {address}" if address else "(local)"
        raise UserError(f"cannot connect to the Ray cluster {where}: {one_line(exc)}") from None


def _check_reachable(address: str) -> None:
    host_port = address.split("://", 1)[-1]
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UserError(f"--address {address!r} is not HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {address}: {one_line(exc)} "
            "(is `ray start --head` running there, and the port open?)"
        ) from None


def retry_note(placement: dict | None) -> str | None:
    """One line for a summary when a model's work lost attempts; None when it did not."""
    lost = (placement or {}).get("lost_attempts") or []
    if not lost:
        return None
    ran = placement["attempts"]
    end = "then ran" if placement.get("pid") is not None else "no attempt finished"
    return f"{len(lost)} of {ran} attempt(s) on {placement['executor']} lost, {end}: {lost[-1]}"


# --------------------------------------------------------------------------- running


def _call(fn: Callable[..., object], args: tuple, executor: str) -> tuple[object, dict]:
    """Runs in the worker: the function's value and where it ran (read there, not guessed)."""
    where = {
        "executor": executor,
        "node": socket.gethostname(),
        "node_id": None,
        "task_id": None,
        "pid": os.getpid(),
    }
    if executor == "ray":
        import ray

        context = ray.get_runtime_context()
        where.update(node_id=context.get_node_id(), task_id=context.get_task_id())
    return fn(*args), where


def _placement(where: dict, lost: list[str] | None = None) -> dict:
    lost = list(lost or ())
    return {**where, "attempts": len(lost) + 1, "lost_attempts": lost}


def _failed(executor: str, error: str, lost: list[str], raised: bool = False) -> Outcome:
    """No value: every attempt was lost, or the last one raised (``raised``), or none ran."""
    where = {"executor": executor, "node": None, "node_id": None, "task_id": None, "pid": None}
    placement = {**where, "attempts": len(lost) + raised, "lost_attempts": lost}
    return Outcome(None, placement, error)


def _run_pool(items: list[Work], workers: int, retries: int, on_done) -> None:
    """Spawned worker processes. A worker that dies breaks the whole pool, so every item that
    was in flight then is run again alone, in a fresh one-process pool: only the item that
    really crashes uses up its retries and fails."""
    context = multiprocessing.get_context("spawn")
    broken: list[Work] = []
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context) as pool:
        futures = {pool.submit(_call, item.fn, item.args, "local"): item for item in items}
        for future in cf.as_completed(futures):
            item = futures[future]
            try:
                value, where = future.result()
            except BrokenProcessPool:
                broken.append(item)
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
                on_done(item, _failed("local", one_line(exc), [], raised=True))
                continue
            on_done(item, Outcome(value, _placement(where)))
    for item in broken:
        lost = ["a worker process of the pool died (this model's or another's)"]
        while True:
            if len(lost) > retries:
                on_done(item, _failed("local", f"worker process crashed ({lost[-1]})", lost))
                break
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                try:
                    value, where = pool.submit(_call, item.fn, item.args, "local").result()
                except BrokenProcessPool:
                    lost.append("the worker process died running this model alone")
                    continue
                except Exception as exc:  # noqa: BLE001
                    on_done(item, _failed("local", one_line(exc), lost, raised=True))
                    break
            on_done(item, Outcome(value, _placement(where, lost)))
            break


def _run_ray(items: list[Work], retries: int, on_done) -> None:
    """One Ray task per item, with its own CPU and memory request; a task whose worker or
    node died is submitted again (``retries`` times at most). A task the cluster could never
    place (it asks for more than the largest node has) fails at once instead of waiting
    forever."""
    import ray

    remote = ray.remote(_call)
    largest = _largest_node(ray)
    pending: dict = {}

    def submit(item: Work, lost: list[str]) -> None:
        options = {"num_cpus": item.cpus, "memory": item.memory, "max_retries": 0}
        ref = remote.options(name=item.name, **options).remote(item.fn, item.args, "ray")
        pending[ref] = (item, lost)

    for item in items:
        too_big = _unschedulable(item, largest)
        if too_big:
            on_done(item, _failed("ray", too_big, []))
        else:
            submit(item, [])
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            item, lost = pending.pop(ref)
            try:
                value, where = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the function itself raised: a bug
                on_done(item, _failed("ray", one_line(exc.cause or exc), lost, raised=True))
            except ray.exceptions.RayError as exc:  # the worker or its node died
                lost = [*lost, one_line(exc)]
                logger.warning("%s: attempt %d lost: %s", item.name, len(lost), lost[-1])
                if len(lost) > retries:
                    on_done(item, _failed("ray", f"worker crashed ({lost[-1]})", lost))
                else:
                    submit(item, lost)
            else:
                on_done(item, Outcome(value, _placement(where, lost)))


def _largest_node(ray) -> dict[str, float]:
    """The most CPUs and memory any one live node of the cluster offers."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in ("CPU", "memory")}


def _unschedulable(item: Work, largest: dict[str, float]) -> str | None:
    if item.cpus > largest["CPU"]:
        return f"asks for {item.cpus:g} CPUs; the largest Ray node has {largest['CPU']:g}"
    if item.memory > largest["memory"]:
        gib = 1 << 30
        return (
            f"asks for {item.memory / gib:.1f} GiB of memory; the largest Ray node has "
            f"{largest['memory'] / gib:.1f} GiB"
        )
    return None
