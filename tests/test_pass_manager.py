"""The pass manager must catch and roll back wrong, crashing and invalid passes, name them,
and keep the good passes' work, in both verification modes."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from graph_passes.base import GraphPass
from graph_passes.testing.helpers import AddToSub, model_from_text, op_list
from pipeline.pass_manager import VerifiedPassManager
from pipeline.runtime import inputs
from pipeline.runtime import sessions as runners
from pipeline.runtime.compare import Tolerance
from pipeline.verify import Verifier

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
  i = Identity(x)
  c = Constant<value = float[4] {1.0, 2.0, 3.0, 4.0}>()
  a = Add(i, c)
  y = Relu(a)
}
"""


class DropIdentity(GraphPass):
    """Correct: bypasses Identity nodes."""

    name = "drop_identity"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        for node in list(model.graph):
            if node.op_type == "Identity" and not node.outputs[0].is_graph_output():
                node.outputs[0].replace_all_uses_with(node.inputs[0])
                model.graph.remove(node, safe=True)
                self.matches += 1
        return self.result(model)


class Crash(GraphPass):
    name = "crash"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.graph.remove(list(model.graph)[-1])  # damage first, then fail
        raise RuntimeError("boom")


class InventOp(GraphPass):
    """Invalid on purpose: renames Relu to an op ONNX does not have."""

    name = "invent_op"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "NoSuchOp"
                self.matches += 1
        return self.result(model)


FACTORY = {cls.name: cls for cls in (DropIdentity, AddToSub, Crash, InventOp)}


def _manager(names: list[str], model: ir.Model, mode: str) -> VerifiedPassManager:
    sets = inputs.generate_input_sets(model)
    session = runners.create_session(model)
    verifier = Verifier(sets, runners.run_all(session, sets), Tolerance(rtol=1e-5, atol=1e-6))
    return VerifiedPassManager(names, verifier, mode=mode, pass_factory=lambda n: FACTORY[n]())


@pytest.mark.parametrize("mode", ["per-pass", "end"])
@pytest.mark.parametrize(
    ("bad", "stage"), [("add_to_sub", "parity"), ("crash", "raised"), ("invent_op", "checker")]
)
def test_bad_pass_is_rolled_back_and_named(mode: str, bad: str, stage: str) -> None:
    model = model_from_text(MODEL)
    manager = _manager([bad, "drop_identity"], model, mode)
    result = manager.run(model)
    assert list(result.rolled_back) == [bad]
    assert stage in result.rolled_back[bad]
    # The good pass still ran; the bad one left no trace.
    assert op_list(result.model) == ["Constant", "Add", "Relu"]
    rolled = [r for r in result.records if r.verification == "rolled_back"]
    assert [r.name for r in rolled] == [bad]


@pytest.mark.parametrize("mode", ["per-pass", "end"])
def test_good_passes_reach_fixed_point_and_are_verified(mode: str) -> None:
    model = model_from_text(MODEL)
    result = _manager(["drop_identity"], model, mode).run(model)
    assert result.rolled_back == {}
    assert op_list(result.model) == ["Constant", "Add", "Relu"]
    modified = [r for r in result.records if r.modified]
    assert len(modified) == 1 and modified[0].verification == "passed"
    assert modified[0].nodes_before == 4 and modified[0].nodes_after == 3
    assert result.iterations == 2  # the second iteration confirms the fixed point


def test_end_mode_bisects_to_the_culprit_among_several_applications() -> None:
    model = model_from_text(MODEL)
    result = _manager(["drop_identity", "add_to_sub"], model, "end").run(model)
    assert list(result.rolled_back) == ["add_to_sub"]
    assert op_list(result.model) == ["Constant", "Add", "Relu"]


class DropOneIdentity(GraphPass):
    """Correct, and slow on purpose: bypasses one Identity per run."""

    name = "drop_one_identity"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.matches = 0
        for node in list(model.graph):
            if node.op_type == "Identity" and not node.outputs[0].is_graph_output():
                node.outputs[0].replace_all_uses_with(node.inputs[0])
                model.graph.remove(node, safe=True)
                self.matches = 1
                break
        return self.result(model)


class IdentitiesSeen(GraphPass):
    """Registered under a name whose class waits for the fixed point; records what it saw."""

    seen: list[int] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        IdentitiesSeen.seen.append(sum(n.op_type == "Identity" for n in model.graph))
        self.matches = 0
        return self.result(model)


@pytest.mark.parametrize("mode", ["per-pass", "end"])
def test_a_waiting_pass_runs_only_after_the_fixed_point(mode: str) -> None:
    """fuse_packed_matmuls waits (after_fixed_point): it first runs once the other passes
    have stopped changing the model, so it never sees a pattern they were still to fuse."""
    model = model_from_text(MODEL.replace("i = Identity(x)", "j = Identity(x)\n  i = Identity(j)"))
    factory = {"drop_one_identity": DropOneIdentity, "fuse_packed_matmuls": IdentitiesSeen}
    sets = inputs.generate_input_sets(model)
    verifier = Verifier(
        sets, runners.run_all(runners.create_session(model), sets), Tolerance(1e-5, 1e-6)
    )
    IdentitiesSeen.seen = []
    manager = VerifiedPassManager(
        ["fuse_packed_matmuls", "drop_one_identity"],
        verifier,
        mode=mode,
        pass_factory=lambda n: factory[n](),
    )
    result = manager.run(model)
    assert op_list(result.model) == ["Constant", "Add", "Relu"]
    # iterations 1, 2 drop one Identity each, 3 changes nothing: only then (iteration 4)
    # does the waiting pass run, and the loop ends after that quiet iteration
    assert IdentitiesSeen.seen == [0] and result.iterations == 4
