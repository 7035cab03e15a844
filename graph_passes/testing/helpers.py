"""Shared helpers for pass and fusion tests: build, apply, and check the four things every
pass test must assert (exact op list, parity at ORT_DISABLE_ALL, checker, must-not-fire).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes.base import GraphPass
from pipeline.runtime import inputs
from pipeline.runtime import sessions as runners
from pipeline.runtime.compare import Tolerance, compare_sets


def model_from_text(text: str) -> ir.Model:
    """Parse ONNX text syntax (``onnx.parser``) into an onnx-ir model."""
    return ir.from_proto(onnx.parser.parse_model(text))


def dynamo_sizes(source: str) -> str:
    """ONNX text for ``batch`` and ``seq`` (``[1]`` each), dims 0 and 1 of ``source`` read the
    way the dynamo exporter without its optimizer reads sizes, ``Reshape(Squeeze(Shape(x)[i:
    i+1]), [-1])`` (ONNX's data propagation stops at that Reshape); the graph must hold an
    ``int64[1] minus_one = {-1}``."""
    return f"""
  b0 = Shape <start = 0, end = 1> ({source})
  b = Squeeze(b0)
  batch = Reshape(b, minus_one)
  s0 = Shape <start = 1, end = 2> ({source})
  s = Squeeze(s0)
  seq = Reshape(s, minus_one)"""


def apply_pass(pass_: GraphPass, model: ir.Model) -> tuple[ir.Model, ir.passes.PassResult]:
    """Run ``pass_`` on a clone of ``model``; the original is left untouched for parity."""
    candidate = model.clone()
    result = pass_(candidate)
    return candidate, result


def op_list(model: ir.Model) -> list[str]:
    """Op types of the main graph in node order (topologically sorted first)."""
    model.graph.sort()
    return [node.op_type for node in model.graph]


def check(model: ir.Model) -> None:
    """Full ONNX checker with strict shape inference."""
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def assert_parity(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: list[dict[str, np.ndarray]] | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
) -> None:
    """Both models give the same outputs under ORT with all its optimizations disabled."""
    sets = feeds if feeds is not None else inputs.generate_input_sets(reference, seed=seed)
    ref_session = runners.create_session(reference, optimization="disable_all")
    cand_session = runners.create_session(candidate, optimization="disable_all")
    assert ref_session.output_names == cand_session.output_names
    comparison = compare_sets(
        runners.run_all(ref_session, sets),
        runners.run_all(cand_session, sets),
        Tolerance(rtol=rtol, atol=atol),
    )
    assert comparison.passed, comparison.summary()


class AddToSub(GraphPass):
    """Wrong on purpose: turns every standard ``Add`` of the main graph into ``Sub``.

    A valid graph with wrong numbers: what the verifier must catch and roll back. Used by the
    pass-manager and fuzz tests and by ``scripts/ci_optimize.py --inject-broken-pass``.
    """

    name = "add_to_sub"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        for node in model.graph:
            if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
                node.op_type = "Sub"
                self.matches += 1
        return self.result(model)
