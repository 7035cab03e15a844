"""Run passes to a fixed point, verify them, and roll back any pass that breaks the model.

Two verification strategies, same guarantee:

* ``per-pass``: every application that modified the model is verified at once; a failure
  restores the snapshot taken before it. Precise, and cheap for small and medium models.
* ``end``: passes run unverified, a snapshot is kept after each modifying application, the
  final model is verified once, and only on failure the snapshots are bisected to find the
  first bad application. That pass is disabled, the pipeline resumes from the last good
  snapshot, and the loop repeats until the result verifies. Much faster on big models,
  where each verification costs a multi-GB ONNX Runtime session.

Snapshots are ``Model.clone()``: graphs are copied, tensors are shared, which is why passes
must never mutate a tensor in place.

Memory: onnx-ir memory-maps an external tensor the first time a pass reads it and keeps the
mapping (resident, counted in the process's RSS) for as long as the tensor lives, and
snapshots keep even removed tensors alive. On a multi-GB model that is a second copy of the
weights next to the one the verification session holds, so every mapping a pass opened is
closed again right after the pass (the next read maps it anew, from the page cache).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from graph_passes.base import GraphPass
from graph_passes.registry import REGISTRY, create_pass
from pipeline.verify import Verdict, Verifier

logger = logging.getLogger(__name__)

# Models whose tensors exceed this are verified once at the end (mode "auto").
AUTO_END_VERIFY_BYTES = 512 * 1024 * 1024


@dataclass
class PassRecord:
    """One application of one pass (what the report lists)."""

    name: str
    iteration: int
    modified: bool
    nodes_before: int
    nodes_after: int
    seconds: float
    matches: int
    verification: str  # passed | rolled_back | unverified | not_needed | pending | failed
    reason: str = ""
    verify_seconds: float = 0.0


@dataclass
class PassManagerResult:
    model: ir.Model
    records: list[PassRecord]
    rolled_back: dict[str, str] = field(default_factory=dict)  # pass name -> reason
    iterations: int = 0
    final_verdict: Verdict | None = None


def count_nodes(model: ir.Model) -> int:
    """Nodes in all graphs, subgraphs included."""
    return sum(len(graph) for graph in model.graphs())


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    return [
        value.const_value
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    ]


def release_mappings(tensors: list[ir.ExternalTensor]) -> None:
    """Close the memory maps of ``tensors``; data is mapped again when next read."""
    for tensor in tensors:
        try:
            tensor.release()
        except BufferError:  # someone still holds an array over the mapping: keep it
            logger.debug("mapping of %s still in use; not released", tensor.name)


def _sort_all(model: ir.Model) -> None:
    for graph in model.graphs():
        graph.sort()


Listener = Callable[[PassRecord], None]


class VerifiedPassManager:
    """Applies an ordered list of named passes until none modifies the model."""

    def __init__(
        self,
        pass_names: list[str] | tuple[str, ...],
        verifier: Verifier,
        *,
        max_iterations: int = 8,
        mode: str = "per-pass",
        on_record: Listener | None = None,
        pass_factory: Callable[[str], GraphPass] = create_pass,
    ) -> None:
        if mode not in ("per-pass", "end"):
            raise ValueError(f"mode must be per-pass or end, got {mode}")
        self.pass_names = list(pass_names)
        self.verifier = verifier
        self.max_iterations = max_iterations
        self.mode = mode
        self.on_record = on_record or (lambda record: None)
        self.pass_factory = pass_factory

    def run(self, model: ir.Model) -> PassManagerResult:
        result = PassManagerResult(model, [])
        _sort_all(model)
        if self.mode == "per-pass":
            self._run_per_pass(result)
        else:
            self._run_end_verified(result)
        return result

    # -- one application -------------------------------------------------------------

    def _apply(self, name: str, model: ir.Model, iteration: int) -> tuple[PassRecord, bool]:
        """Apply a pass in place; returns its record and whether it raised."""
        pass_ = self.pass_factory(name)
        before = count_nodes(model)
        mapped = _external_tensors(model)
        start = time.perf_counter()
        try:
            modified = pass_(model).modified
            _sort_all(model)
        except Exception as exc:  # a crashing pass is rolled back like a wrong one
            logger.debug("pass %s raised", name, exc_info=True)
            seconds = time.perf_counter() - start
            reason = f"raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            record = PassRecord(
                name, iteration, False, before, before, seconds, 0, "rolled_back", reason
            )
            return record, True
        finally:
            release_mappings(mapped + _external_tensors(model))
        seconds = time.perf_counter() - start
        record = PassRecord(
            name,
            iteration,
            modified,
            before,
            count_nodes(model),
            seconds,
            pass_.matches,
            "pending" if modified else "not_needed",
        )
        return record, False

    def _emit(self, result: PassManagerResult, record: PassRecord) -> None:
        result.records.append(record)
        self.on_record(record)

    # -- per-pass verification ---------------------------------------------------------

    def _waits(self, name: str) -> bool:
        """Whether ``name`` runs only after the others reach their fixed point."""
        return getattr(REGISTRY.get(name), "after_fixed_point", False)

    def _settled(self, settled: bool, any_modified: bool) -> bool | None:
        """The next iteration's ``settled`` flag; None when the loop is done."""
        if any_modified:
            return settled
        if settled or not any(self._waits(name) for name in self.pass_names):
            return None
        return True  # the others are done: the waiting passes run from now on

    def _run_per_pass(self, result: PassManagerResult) -> None:
        settled: bool | None = False
        for iteration in range(1, self.max_iterations + 1):
            result.iterations = iteration
            any_modified = False
            for name in self.pass_names:
                if name in result.rolled_back or (self._waits(name) and not settled):
                    continue
                snapshot = result.model.clone()
                record, crashed = self._apply(name, result.model, iteration)
                if not crashed and record.modified:
                    verdict = self.verifier.verify(result.model)
                    record.verify_seconds = verdict.seconds
                    if verdict.ok:
                        record.verification = "passed" if self.verifier.can_run else "unverified"
                        any_modified = True
                    else:
                        record.verification = "rolled_back"
                        record.reason = f"{verdict.stage}: {verdict.reason}"
                if record.verification == "rolled_back":
                    result.model = snapshot
                    record.nodes_after = record.nodes_before
                    result.rolled_back[name] = record.reason
                self._emit(result, record)
            settled = self._settled(settled, any_modified)
            if settled is None:
                return

    # -- verify at the end, bisect on failure ------------------------------------------

    def _run_end_verified(self, result: PassManagerResult) -> None:
        state = "passed" if self.verifier.can_run else "unverified"
        while True:
            base = result.model.clone()
            applied: list[PassRecord] = []  # every application, in order
            history: list[tuple[PassRecord, ir.Model]] = []  # modified ones, model after
            self._fixed_point_unverified(result, applied, history)
            verdict = self.verifier.verify(result.model)
            result.final_verdict = verdict
            if verdict.ok or not history:
                for record, _ in history:
                    record.verification = state if verdict.ok else "failed"
                for record in applied:
                    self._emit(result, record)
                return
            bad = self._bisect(history)
            record, bad_model = history[bad]
            bad_verdict = self.verifier.verify(bad_model)
            record.verification = "rolled_back"
            record.reason = f"{bad_verdict.stage}: {bad_verdict.reason}"
            record.verify_seconds = bad_verdict.seconds
            result.rolled_back[record.name] = record.reason
            for good, _ in history[:bad]:
                good.verification = state
            for rec in applied[: applied.index(record) + 1]:
                self._emit(result, rec)
            # Resume from the last good model; the bad pass stays disabled.
            result.model = history[bad - 1][1].clone() if bad > 0 else base

    def _fixed_point_unverified(
        self,
        result: PassManagerResult,
        applied: list[PassRecord],
        history: list[tuple[PassRecord, ir.Model]],
    ) -> None:
        settled: bool | None = False
        for iteration in range(1, self.max_iterations + 1):
            result.iterations = iteration
            any_modified = False
            for name in self.pass_names:
                if name in result.rolled_back or (self._waits(name) and not settled):
                    continue
                snapshot = result.model.clone()
                record, crashed = self._apply(name, result.model, iteration)
                applied.append(record)
                if crashed:
                    result.model = snapshot
                    result.rolled_back[name] = record.reason
                elif record.modified:
                    any_modified = True
                    history.append((record, result.model.clone()))
            settled = self._settled(settled, any_modified)
            if settled is None:
                return

    def _bisect(self, history: list[tuple[PassRecord, ir.Model]]) -> int:
        """Index of the first application whose output fails verification."""
        low, high = 0, len(history) - 1  # the last one is known bad (== final model)
        while low < high:
            mid = (low + high) // 2
            if self.verifier.verify(history[mid][1]).ok:
                low = mid + 1
            else:
                high = mid
        return low
