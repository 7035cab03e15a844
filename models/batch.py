"""Export the model zoo (and local Hugging Face folders) to ONNX, in parallel and resumably.

    python scripts/batch_export.py --all --out artifacts/zoo
    python scripts/batch_export.py --models bert_base,minilm --tiny --jobs 2
    python scripts/batch_export.py --folders ~/models/my-bert --opset 18

Every model runs through one top-level function, :func:`export_one`, which never raises: a
model whose export raises (``models.export.ExportMismatch`` or anything else) is recorded as
``failed`` with a one-line error and the batch goes on. Where it runs is
``pipeline.executors``: local worker processes (``--jobs``, spawn context, torch limited to
one thread per worker) or, with ``--executor ray [--address HOST:PORT]``, one Ray task per
model (the output folder must then be on a filesystem every Ray worker sees at the same
path). A model whose worker dies (segfault, OOM kill, lost node) is run again, at most
``--retries`` times; only the model that really crashes is failed (docs/scale-out.md).

Resumable: a model is skipped when its manifest record has the same ``key`` and the file on
disk still has the recorded ``sha256``; ``--force`` re-exports. The key is the sha256 of the
model name, exporter, opset, tiny flag, the installed versions of torch / transformers /
optimum / onnx / onnxruntime and, for ``--folders``, a hash of the folder's config and
weights files. A skipped model keeps its previous record, with ``status`` set to
``"skipped"`` and ``error`` null (its ``seconds`` and ``execution`` are those of the export
that made the file).

``OUT/manifest.json`` is rewritten atomically (temp file + rename) after every finished
model, so an interrupted batch keeps what it finished. Records of models that are not part
of this run are kept unchanged. Schema (``schema_version`` "1.1"; 1.0 had no ``execution``)::

    {
      "schema_version": "1.1",
      "created": "2026-01-01T12:00:00+00:00",       # ISO 8601, UTC, time of this write
      "versions": {"torch": ..., "transformers": ..., "optimum": ..., "onnx": ...,
                   "onnxruntime": ..., "python": ...},   # null when not installed
      "models": {
        NAME: {
          "status": "ok" | "failed" | "skipped",
          "file": "NAME.onnx",                        # relative to OUT; null when failed
          "sha256": hex | null,
          "opset": int | null,                        # default-domain opset of the file
          "nodes": int | null,                        # all graphs, subgraphs included
          "size_bytes": int | null,                   # model file + external data files
          "export": {"exporter": str | null, "opset": int, "tiny": bool},
          "source": "zoo" | "folder",
          "folder": str | null,                       # the --folders path, if any
          "key": hex,
          "validation": {"passed": bool, ...},        # from the exporter; {} when failed
          "seconds": float,
          "error": str | null,                        # one line, "ExcType: message"
          "execution": {"executor": "local" | "ray", "node": ..., "task_id": ...,
                        "attempts": int, ...}         # where it ran: pipeline/executors.py
        }
      }
    }

Exit codes: 0 every selected model ok or skipped; 1 any failed (the last lines name them, and
the models that needed a retry); 2 bad usage (unknown model name, missing folder, ray not
installed, a Ray cluster that cannot be reached), with a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline import executors
from pipeline.executors import one_line
from pipeline.load import file_sha256
from pipeline.runtime.compare import to_jsonable
from pipeline.runtime.errors import UserError

logger = logging.getLogger("batch_export")
ROOT = Path(__file__).resolve().parents[1]

SCHEMA_VERSION = "1.1"
MANIFEST_NAME = "manifest.json"
KEY_PACKAGES = ("torch", "transformers", "optimum", "onnx", "onnxruntime")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
ExportFn = Callable[..., object]


@dataclasses.dataclass(frozen=True)
class Task:
    """One model to export: everything a worker needs, picklable for both executors."""

    name: str
    out_dir: str
    exporter: str | None
    opset: int
    tiny: bool
    key: str
    folder: str | None = None
    single_thread: bool = False


# --------------------------------------------------------------------------- versions / keys


def package_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (cheap: nothing heavy is imported)."""
    result: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        candidates = (name, "onnxruntime-gpu") if name == "onnxruntime" else (name,)
        result[name] = None
        for dist in candidates:
            try:
                result[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    result["python"] = platform.python_version()
    return result


def folder_hash(folder: Path) -> str:
    """sha256 over the config and weights files of a Hugging Face folder (names + contents)."""
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    )
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def export_key(
    name: str,
    exporter: str | None,
    opset: int,
    tiny: bool,
    versions: dict[str, str | None],
    source_hash: str | None = None,
) -> str:
    """The resumability key: changes whenever the exported file could change."""
    payload = {
        "name": name,
        "exporter": exporter,
        "opset": opset,
        "tiny": tiny,
        "versions": {k: versions.get(k) for k in KEY_PACKAGES},
        "source_hash": source_hash,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- the worker


def _limit_threads() -> None:
    """One thread per worker: N workers x all cores each would thrash the machine."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _file_facts(path: Path) -> dict:
    """sha256, size (with external data), default opset and node count of an exported file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    size = path.stat().st_size
    locations = set()
    for tensor in _all_initializers(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    size += sum((path.parent / loc).stat().st_size for loc in locations)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "sha256": file_sha256(path),
        "size_bytes": size,
        "opset": opset,
        "nodes": _count_nodes(proto.graph),
    }


def _subgraphs(graph) -> Iterable:
    import onnx

    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                yield from attr.graphs


def _count_nodes(graph) -> int:
    return len(graph.node) + sum(_count_nodes(g) for g in _subgraphs(graph))


def _all_initializers(graph) -> Iterable:
    yield from graph.initializer
    for sub in _subgraphs(graph):
        yield from _all_initializers(sub)


def _base_record(task: Task) -> dict:
    return {
        "status": "failed",
        "file": None,
        "sha256": None,
        "opset": None,
        "nodes": None,
        "size_bytes": None,
        "export": {"exporter": task.exporter, "opset": task.opset, "tiny": task.tiny},
        "source": "folder" if task.folder else "zoo",
        "folder": task.folder,
        "key": task.key,
        "validation": {},
        "seconds": 0.0,
        "error": None,
        "execution": None,
    }


def failed_record(task: Task, error: str, seconds: float = 0.0) -> dict:
    """The record of a model whose export did not produce a validated file."""
    return {**_base_record(task), "error": error, "seconds": round(seconds, 3)}


def default_export_fn() -> ExportFn:
    """``models.export.export_model``, imported late (it pulls in torch)."""
    from models.export import export_model

    return export_model


def export_one(task: Task, export_fn: ExportFn | None = None) -> tuple[str, dict]:
    """Export one model and describe the result; never raises (failures become records).

    A plain top-level function so that the process pool and Ray both pickle it by name.
    ``export_fn`` defaults to ``models.export.export_model``; tests inject a fake.
    """
    if task.single_thread:
        _limit_threads()
    start = time.perf_counter()
    path = Path(task.out_dir) / f"{task.name}.onnx"
    try:
        if task.folder is not None:
            result = export_folder(Path(task.folder), path, opset=task.opset)
        else:
            result = (export_fn or default_export_fn())(
                task.name, path, exporter=task.exporter, opset=task.opset, tiny=task.tiny
            )
        validation = to_jsonable(dict(getattr(result, "validation", None) or {}))
        if not validation.get("passed", False):
            raise RuntimeError(f"validation did not pass: {validation}")
        record = _base_record(task)
        record.update(_file_facts(path))
        record["export"]["exporter"] = getattr(result, "exporter", None) or task.exporter
        record.update(status="ok", file=path.name, validation=validation)
    except Exception as exc:  # noqa: BLE001 - failure isolation is the point
        logger.debug("export of %s failed", task.name, exc_info=True)
        return task.name, failed_record(task, one_line(exc), time.perf_counter() - start)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return task.name, record


@dataclasses.dataclass
class FolderExport:
    """What :func:`export_folder` returns (the fields of ``models.export.ExportRecord`` used)."""

    exporter: str
    validation: dict


def export_folder(folder: Path, path: Path, *, opset: int = 17) -> FolderExport:
    """Export a local Hugging Face folder with Optimum (see :func:`infer_task`), validated.

    Optimum's own validation runs the PyTorch model and the ONNX model on the same inputs,
    but it only *logs* a tolerance or output-name mismatch; we capture that warning and
    raise, so the model is recorded as failed instead of shipped.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnx
    from optimum.exporters.onnx import main_export

    warnings: list[str] = []

    class _Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "succeeded with the warning" in record.getMessage():
                warnings.append(record.getMessage())

    optimum_logger = logging.getLogger("optimum.exporters.onnx.convert")
    handler = _Capture(logging.WARNING)
    optimum_logger.addHandler(handler)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=path.parent))
    try:
        task = infer_task(folder)
        main_export(str(folder), staging, task=task, opset=opset, local_files_only=True)
        if warnings:
            raise _mismatch(" ".join(warnings[0].split())[:400])
        produced = staging / "model.onnx"
        if not produced.exists():
            raise RuntimeError(f"optimum wrote {sorted(p.name for p in staging.iterdir())}")
        model = onnx.load(str(produced))
        large = model.ByteSize() > 1_800_000_000 if hasattr(model, "ByteSize") else False
        staged = staging / f".{path.name}"
        onnx.save(model, str(staged), save_as_external_data=large, location=f"{path.name}.data")
        if large:
            os.replace(staging / f"{path.name}.data", path.parent / f"{path.name}.data")
        os.replace(staged, path)
    finally:
        optimum_logger.removeHandler(handler)
        shutil.rmtree(staging, ignore_errors=True)
    return FolderExport(
        exporter="optimum", validation={"passed": True, "tool": "optimum", "task": task}
    )


def infer_task(folder: Path) -> str:
    """The Optimum task of a local folder, from ``config.json``'s ``architectures``.

    ``main_export(task="auto")`` refuses local folders ("Cannot infer the task from a local
    directory"), so we map the architecture class the way Optimum does for Hub models;
    a config without ``architectures`` is exported as ``feature-extraction``.
    """
    import transformers
    from optimum.exporters.tasks import TasksManager

    config = json.loads((folder / "config.json").read_text())
    for architecture in config.get("architectures") or []:
        model_class = getattr(transformers, architecture, None)
        if model_class is not None:
            return TasksManager.infer_task_from_model(model_class)
    return "feature-extraction"


def _mismatch(message: str) -> Exception:
    try:
        from models.export import ExportMismatch
    except ImportError:
        return RuntimeError(message)
    return ExportMismatch(message)


# --------------------------------------------------------------------------- manifest


def load_manifest(out_dir: Path) -> dict:
    """The previous manifest, or an empty one when there is none or it is unreadable."""
    try:
        data = json.loads((out_dir / MANIFEST_NAME).read_text())
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"models": {}}


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Write ``OUT/manifest.json`` atomically: a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".json.tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(to_jsonable(manifest), handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out_dir / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_fresh(record: dict | None, key: str, out_dir: Path) -> bool:
    if not record or record.get("status") not in ("ok", "skipped") or record.get("key") != key:
        return False
    path = out_dir / (record.get("file") or "")
    return bool(record.get("file")) and path.is_file() and file_sha256(path) == record["sha256"]


# --------------------------------------------------------------------------- entry points


def known_models() -> list[str]:
    """Names the zoo exports (``models.export.list_models`` when it exists)."""
    try:
        from models.export import list_models
    except ImportError:
        from models.zoo import ZOO

        return sorted(ZOO)
    return list(list_models())


def _default_exporter(name: str) -> str | None:
    try:
        from models.zoo import ZOO
    except ImportError:
        return None
    entry = ZOO.get(name)
    return entry.exporters[0] if entry is not None and entry.exporters else None


def _folder_name(folder: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", folder.resolve().name) or "model"


def export_all(
    names: Iterable[str] | None,
    out_dir: str | os.PathLike,
    *,
    exporter: str | None = None,
    opset: int = 17,
    tiny: bool = False,
    jobs: int | None = None,
    force: bool = False,
    executor: str = "local",
    address: str | None = None,
    retries: int = executors.DEFAULT_RETRIES,
    folders: Iterable[str | os.PathLike] = (),
    export_fn: ExportFn | None = None,
    progress: bool = True,
) -> dict:
    """Export ``names`` (None: the whole zoo) and ``folders`` into ``out_dir``; return the manifest.

    This is what the CI job calls. Failures of single models never raise: they are records
    with ``status == "failed"``; :func:`exit_code` turns the manifest into 0 or 1.

    Args:
        names: zoo model names (checked against :func:`known_models`), or None for all.
        out_dir: output folder; ``manifest.json`` and ``NAME.onnx`` files are written there.
        exporter: None for each entry's default exporter (the key records the resolved one).
        jobs: worker processes (default ``min(2, os.cpu_count())``); 1 runs in-process.
        force: re-export even when the manifest says the file is up to date.
        executor / address / retries: ``"local"`` (``jobs`` processes) or ``"ray"`` (the
            cluster at ``address``; None starts a local one); runs again after a worker
            died (``pipeline.executors``).
        folders: local Hugging Face model folders, exported with Optimum as ``<dir name>``.
        export_fn: replaces ``models.export.export_model`` (tests; must be picklable by
            reference, i.e. a module-level function, when ``jobs > 1``).
        progress: show the progress bar / per-model lines.

    Returns:
        The manifest as written to ``out_dir/manifest.json``, plus ``"run"``: the names this
        call exported or skipped, in order (records of other models are kept in the file).

    Raises:
        UserError: unknown model name, missing folder, bad executor, ray not installed or
            its cluster not reachable.
    """
    out = Path(out_dir).resolve()  # the path a worker in another folder or node is given
    selected = known_models() if names is None else list(dict.fromkeys(names))
    known = set(known_models()) if names is not None else set(selected)
    unknown = [n for n in selected if n not in known]
    if unknown:
        raise UserError(
            f"unknown model(s): {', '.join(unknown)} (known: {', '.join(sorted(known)) or 'none'})"
        )
    versions = package_versions()
    tasks = [Task(n, str(out), exporter or _default_exporter(n), opset, tiny, "") for n in selected]
    tasks = [
        dataclasses.replace(t, key=export_key(t.name, t.exporter, opset, tiny, versions))
        for t in tasks
    ]
    for folder in map(Path, folders):
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} is not a Hugging Face model folder (no config.json)")
        name = _folder_name(folder)
        if any(t.name == name for t in tasks):
            raise UserError(f"two models would be written as {name}.onnx")
        key = export_key(name, "optimum", opset, False, versions, folder_hash(folder))
        tasks.append(Task(name, str(out), "optimum", opset, False, key, str(folder.resolve())))
    if not tasks:
        raise UserError("no models selected")
    if jobs is None:
        jobs = min(2, os.cpu_count() or 1)
    runner = executors.make(executor, jobs, address, retries)
    if not runner.in_process:
        tasks = [dataclasses.replace(t, single_thread=True) for t in tasks]

    out.mkdir(parents=True, exist_ok=True)
    records: dict = load_manifest(out)["models"]
    todo = []
    for task in tasks:
        if not force and _is_fresh(records.get(task.name), task.key, out):
            records[task.name] = {**records[task.name], "status": "skipped", "error": None}
        else:
            todo.append(task)
    skipped = [t.name for t in tasks if t not in todo]

    def save() -> dict:
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": versions,
            "models": records,
        }
        write_manifest(out, manifest)
        return manifest

    with _Progress(len(tasks), enabled=progress) as bar:
        for name in skipped:
            bar.advance(name, records[name])
        save()

        def on_done(item: executors.Work, outcome: executors.Outcome) -> None:
            task = item.args[0]
            if outcome.value is None:
                record = failed_record(task, outcome.error or "no result")
            else:
                record = outcome.value[1]
            record["execution"] = outcome.placement
            records[task.name] = record
            save()
            bar.advance(task.name, record)

        runner.run([_work(task, records.get(task.name), export_fn) for task in todo], on_done)
    # Keep the key order stable and readable: this run's models first, in request order.
    ordered = {t.name: records[t.name] for t in tasks}
    records = {**ordered, **{k: v for k, v in records.items() if k not in ordered}}
    manifest = save()
    manifest["run"] = [t.name for t in tasks]  # not written: lets callers tell this run apart
    return manifest


def _work(task: Task, previous: dict | None, export_fn: ExportFn | None) -> executors.Work:
    """One export as executor work; its memory request grows with the size the model's last
    export had (unknown the first time)."""
    size = (previous or {}).get("size_bytes")
    memory = executors.memory_request(size if isinstance(size, int) else None)
    return executors.Work(task.name, export_one, (task, export_fn), memory=memory)


class _Progress:
    """A rich progress bar on a terminal; one plain line per finished model otherwise."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        from rich.console import Console

        self.total, self.done, self.enabled = total, 0, enabled
        self.console = Console(stderr=True)
        self.bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self.bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.task_id = self.bar.add_task("exporting", total=total)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, name: str, record: dict) -> None:
        self.done += 1
        status = record["status"]
        line = f"[{self.done}/{self.total}] {name}: {status} ({record.get('seconds', 0):.1f}s)"
        if record.get("error"):
            line += f" - {record['error']}"
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
            self.bar.update(self.task_id, advance=1, description=name)
        elif self.enabled:
            print(line, flush=True)


def closing_lines(manifest: dict) -> list[str]:
    """What a run's last lines say: the models of this run that lost attempts to a dead
    worker (a skipped model's record is an earlier run's), then those that failed."""
    records = [(name, manifest["models"][name]) for name in manifest["run"]]
    lines = []
    for name, record in records:
        note = executors.retry_note(record["execution"]) if record["status"] != "skipped" else None
        if note:
            lines.append(f"retried: {name}: {note}")
    failed = [name for name, record in records if record["status"] == "failed"]
    if failed:
        lines.append(f"failed ({len(failed)}/{len(records)}): {', '.join(failed)}")
    return lines


def exit_code(manifest: dict) -> int:
    """0 when every model of the run is ok or skipped, 1 when any failed."""
    run = manifest.get("run", list(manifest["models"]))
    return 1 if any(manifest["models"][n]["status"] == "failed" for n in run) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="zoo models: " + ", ".join(known_models()),
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every model of the zoo")
    which.add_argument("--models", help="comma-separated zoo model names (listed below)")
    parser.add_argument("--folders", nargs="+", default=[], help="local Hugging Face folders")
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "zoo"), help="output folder")
    parser.add_argument("--exporter", help="torch-legacy | torch-dynamo | optimum")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    parser.add_argument("--tiny", action="store_true", help="few-layer models (seconds each)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (default: 2, or 1 on a one-core machine)",
    )
    executors.add_arguments(parser)
    parser.add_argument("--force", action="store_true", help="re-export even when up to date")
    args = parser.parse_args(argv)
    if not (args.all or args.models or args.folders):
        parser.error("choose --all, --models a,b or --folders DIR ...")
    names: list[str] | None
    if args.all:
        names = None
    else:
        names = [n.strip() for n in (args.models or "").split(",") if n.strip()]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = export_all(
            names,
            args.out,
            exporter=args.exporter,
            opset=args.opset,
            tiny=args.tiny,
            jobs=args.jobs,
            force=args.force,
            executor=args.executor,
            address=args.address,
            retries=args.retries,
            folders=args.folders,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in closing_lines(manifest):
        print(line)
    print(f"manifest: {Path(args.out) / MANIFEST_NAME}")
    return exit_code(manifest)
