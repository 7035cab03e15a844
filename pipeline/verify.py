"""Is a candidate model still the same model? Checker, ONNX Runtime load, output parity.

Candidates are always compared with the ORIGINAL model's outputs (not the previous pass's),
so small per-pass errors cannot accumulate past the user's budget unnoticed. ONNX Runtime
runs with all its graph optimizations disabled here, so its own fusions cannot mask a bug in
ours.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from pipeline.runtime import opaque_types
from pipeline.runtime import sessions as runners
from pipeline.runtime.compare import Comparison, Tolerance, compare_sets
from pipeline.runtime.inputs import Feeds

logger = logging.getLogger(__name__)


@dataclass
class Verdict:
    """The outcome of verifying one candidate model."""

    ok: bool
    stage: str  # where it failed: checker | load | run | parity; "" when ok
    reason: str
    seconds: float
    comparison: Comparison | None = None


class Verifier:
    """Verifies candidates against reference outputs computed once from the original."""

    def __init__(
        self,
        input_sets: list[Feeds],
        reference_outputs: list[runners.Outputs] | None,
        tolerance: Tolerance,
        overrides: dict[str, Tolerance] | None = None,
    ) -> None:
        self.input_sets = input_sets
        self.reference_outputs = reference_outputs
        self.tolerance = tolerance
        self.overrides = overrides or {}

    @property
    def can_run(self) -> bool:
        """False when the original model itself could not be run (checker-only mode)."""
        return self.reference_outputs is not None

    def verify(self, model: ir.Model) -> Verdict:
        start = time.perf_counter()

        def verdict(stage: str, reason: str, comparison: Comparison | None = None) -> Verdict:
            ok = stage == ""
            return Verdict(ok, stage, reason, time.perf_counter() - start, comparison)

        try:
            run_checker(model)
        except Exception as exc:
            return verdict("checker", f"ONNX checker: {_one_line(exc)}")
        if not self.can_run:
            return verdict("", "")
        try:
            session = runners.create_session(model, optimization="disable_all")
        except Exception as exc:
            return verdict("load", f"ONNX Runtime cannot load it: {_one_line(exc)}")
        try:
            outputs = runners.run_all(session, self.input_sets)
        except Exception as exc:
            return verdict("run", f"ONNX Runtime failed to run it: {_one_line(exc)}")
        comparison = compare_sets(self.reference_outputs, outputs, self.tolerance, self.overrides)
        if not comparison.passed:
            return verdict("parity", comparison.summary(), comparison)
        return verdict("", "", comparison)


def run_checker(model: ir.Model) -> None:
    """The ONNX checker on ``model``; by file when it has external data (which the checker
    resolves relative to the model file, and which must not be read into memory)."""
    if runners.has_external_tensors(model):
        with runners.model_on_disk(model) as path:
            onnx.checker.check_model(str(path), full_check=False)
    else:
        onnx.checker.check_model(opaque_types.to_proto(model), full_check=False)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:400]
