"""Kernel-timing verdicts kept on disk, so that optimizing a model twice on one machine
writes the same file.

Why: a timed fusion decision (``kernel_timing``) is a measurement, and on a shared 2-core
machine two runs of the CLI on MiniLM's dynamo export, started side by side, once made one
decision differently and wrote different files. Here the first verdict for a structure is
kept and every later run reuses it instead of measuring again, so the output is a function of
the model and of this cache, the way TensorRT's timing cache pins its tactic choices.

One file per machine identity (CPU model, logical cores, onnxruntime version, this format):
a verdict from another CPU or ORT build says nothing here. The root is ``$OVO_CACHE_DIR`` or
``~/.cache/onnx-verified-optimizer`` (as for the TensorRT engine cache), the file
``kernel_timing/<identity hash>.json``; delete it to measure again. A cache that cannot be
read or written is treated as empty (a warning in the log), never an error: the verdicts are
then measured as before.

Only clean verdicts are stored (``kernel_timing``: noise below the margin, or a verdict
decisive despite it), each with its noise: a verdict measured on a loaded machine would
otherwise stick for every later run. ``--retime`` replaces a stored verdict with a new clean
one (``remember(..., replace=True)``). Format 1 stored every verdict, noisy or not, so its
files are ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from pipeline.runtime import machine
from pipeline.runtime.atomic_write import write_text_atomic

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

FORMAT = 2  # bump when what a verdict means changes (cut sizes, margin): old files are ignored
# 2: only clean verdicts (noise below the margin, or decisive), stored with their noise

# (median ratio, rounds, verdict, noise), as kernel_timing measures
Verdict = tuple[float, int, str, float]


def machine_identity() -> dict[str, str]:
    """What a kernel timing depends on besides the model. The CPU is its model name and a
    digest of its feature flags: this project's machines all call themselves "AMD EPYC",
    some with AVX-512 VNNI and some without, and their verdicts differ (contrib Gelu: 0.97x
    the erf form's time on one, 1.18x on the other)."""
    import onnxruntime

    cpu = machine.cpu()
    model, flags = cpu.model, " ".join(sorted(cpu.flags))
    return {
        "cpu": model,
        "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:12],
        "logical_cores": str(os.cpu_count()),
        "onnxruntime": onnxruntime.__version__,
        "format": str(FORMAT),
    }


def store_path() -> Path:
    identity = json.dumps(machine_identity(), sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return machine.cache_root() / "kernel_timing" / f"{digest}.json"


def key(original_signature: str, candidate_signature: str, threads: int) -> str:
    text = f"{original_signature}\n{candidate_signature}\n{threads}"
    return hashlib.sha256(text.encode()).hexdigest()


class TimingStore:
    """The verdicts of one machine identity, read once per process, written through."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, list] = self._read()
        self.measured_here: set[str] = set()  # keys whose verdict this process measured
        # keys this process measured too noisy to decide (never written): identical
        # structures later in the run get the same answer instead of measuring again
        self.undecided: dict[str, tuple] = {}

    def get(self, entry_key: str) -> Verdict | None:
        entry = self.entries.get(entry_key)
        if not (isinstance(entry, list) and len(entry) == 4):
            return None
        ratio, rounds, verdict, noise = entry
        return float(ratio), int(rounds), str(verdict), float(noise)

    def remember(self, entry_key: str, verdict: Verdict, *, replace: bool = False) -> Verdict:
        """Keep ``verdict`` unless another run stored one for this key first, and return the
        one kept: a run that measured at the same time as another then uses the other's
        verdict, so both write the same model. ``replace`` (``--retime``): this verdict
        replaces a stored one. The file is merged and replaced under a lock (temp file +
        rename: a reader never sees half a file)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.path.with_suffix(".lock")):
                self.entries = self.entries | self._read()  # on disk first: it was first
                if replace:
                    self.entries[entry_key] = list(verdict)
                self.entries.setdefault(entry_key, list(verdict))
                document = {"machine": machine_identity(), "verdicts": self.entries}
                text = json.dumps(document, indent=0, sort_keys=True)
                write_text_atomic(self.path, text, prefix=".tmp-timing-")
        except OSError as exc:
            logger.warning("kernel timing cache %s not written: %s", self.path, exc)
            if replace:
                self.entries[entry_key] = list(verdict)
            self.entries.setdefault(entry_key, list(verdict))
        kept = self.get(entry_key) or verdict
        if kept == verdict:
            self.measured_here.add(entry_key)
        return kept

    def _read(self) -> dict[str, list]:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("kernel timing cache %s unreadable, ignored: %s", self.path, exc)
            return {}
        verdicts = document.get("verdicts") if isinstance(document, dict) else None
        return dict(verdicts) if isinstance(verdicts, dict) else {}


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive lock across processes where the OS has ``fcntl`` (elsewhere: none)."""
    with open(lock_path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


_stores: dict[Path, TimingStore] = {}


def open_store() -> TimingStore:
    """This machine's store (one per path and process: ``$OVO_CACHE_DIR`` may change)."""
    path = store_path()
    if path not in _stores:
        _stores[path] = TimingStore(path)
    return _stores[path]
