"""Differential fuzzing: every registered pass, alone and as the default recipe, must keep
random valid graphs valid and their outputs unchanged (rtol=1e-4, atol=1e-5).

The graphs come from ``graph_passes.testing.fuzzing.random_model(seed)``; hypothesis drives the seed
(derandomized, so CI is deterministic), and ``scripts/fuzz_passes.py`` runs long campaigns
over the same generator. Every graph a campaign found failing is saved in
``tests/fuzz_regressions/<pass>-<hash>.onnx`` and replayed here.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from graph_passes.registry import REGISTRY
from graph_passes.testing import fuzzing
from graph_passes.testing.helpers import AddToSub
from pipeline.pass_manager import VerifiedPassManager
from pipeline.recipe import load_recipe
from pipeline.runtime import inputs
from pipeline.runtime import sessions as runners
from pipeline.runtime.compare import Tolerance
from pipeline.verify import Verifier

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = ROOT / "tests" / "fuzz_regressions"
DEFAULT_PASSES = load_recipe("default").passes
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
CI = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _ops(proto: onnx.ModelProto) -> Counter:
    found: Counter = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(proto.graph)
    return found


def test_generator_is_deterministic_valid_and_covers_the_ops() -> None:
    seeds = range(60)
    protos = [fuzzing.random_model(seed) for seed in seeds]
    assert protos[7].SerializeToString() == fuzzing.random_model(7).SerializeToString()
    valid = [p for p in protos if fuzzing.is_valid(p)]
    assert len(valid) >= 0.9 * len(protos)
    ops = sum((_ops(p) for p in valid), Counter())
    wanted = {"Add", "Mul", "Sub", "Div", "Relu", "Neg", "Sigmoid", "Tanh", "Abs"}
    wanted |= {"MatMul", "Gemm", "Conv", "BatchNormalization", "Reshape", "Transpose"}
    wanted |= {"Concat", "Slice", "Gather", "Squeeze", "Unsqueeze", "Shape", "Constant"}
    wanted |= {"Identity", "Dropout", "If"}
    assert wanted <= set(ops), wanted - set(ops)
    assert any(p.graph.initializer for p in valid)
    dims = {d.dim_param for p in valid for i in p.graph.input for d in i.type.tensor_type.shape.dim}
    assert {"batch", "seq"} <= dims
    # Duplicated subexpressions: the same op on the same inputs twice in one graph.
    assert any(
        len({(n.op_type, tuple(n.input)) for n in p.graph.node if n.op_type != "Constant"})
        < sum(n.op_type != "Constant" for n in p.graph.node)
        for p in valid
    )


@CI
@given(seed=SEEDS, batch=st.sampled_from([None, None, 2]))
def test_every_pass_and_the_default_recipe_preserve_random_graphs(
    seed: int, batch: int | None
) -> None:
    # batch=None: a named dynamic batch dim; 2: fully static, so every Shape can fold.
    proto = fuzzing.random_model(seed, batch=batch)
    assume(fuzzing.is_valid(proto))
    failures = fuzzing.check_model(proto, DEFAULT_PASSES)
    assert failures == [], f"seed {seed}, batch {batch}: {failures}"


def test_the_differential_check_catches_a_wrong_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    proto = fuzzing.random_model(3, final_add=True)
    assert fuzzing.is_valid(proto)
    real = fuzzing.create_pass
    monkeypatch.setattr(
        fuzzing, "create_pass", lambda n: AddToSub() if n == "remove_dead" else real(n)
    )
    failures = fuzzing.check_model(proto, DEFAULT_PASSES)
    assert {f.pass_name for f in failures} == {"remove_dead", "default"}
    assert {f.stage for f in failures} == {"parity"}


def _verifier(model: ir.Model) -> Verifier:
    sets = inputs.generate_input_sets(model)
    reference = runners.run_all(runners.create_session(model), sets)
    return Verifier(sets, reference, Tolerance(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("mode", ["per-pass", "end"])
@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=SEEDS)
def test_manager_rolls_back_and_names_a_wrong_pass_on_generated_graphs(
    mode: str, seed: int
) -> None:
    proto = fuzzing.random_model(seed, final_add=True)
    assume(fuzzing.is_valid(proto))
    model = ir.from_proto(proto)
    verifier = _verifier(ir.from_proto(proto))
    names = ["flip_add", *DEFAULT_PASSES]
    factory = {**REGISTRY, "flip_add": AddToSub}
    manager = VerifiedPassManager(names, verifier, mode=mode, pass_factory=lambda n: factory[n]())
    result = manager.run(model)
    assert list(result.rolled_back) == ["flip_add"]
    assert result.rolled_back["flip_add"].startswith("parity")
    rolled = [r.name for r in result.records if r.verification == "rolled_back"]
    assert rolled == ["flip_add"]
    assert verifier.verify(result.model).ok
    # The good passes' result is still the original model, numerically.
    sets = inputs.generate_input_sets(ir.from_proto(proto), seed=1)
    want = runners.run_all(runners.create_session(ir.from_proto(proto)), sets)
    got = runners.run_all(runners.create_session(result.model), sets)
    for expected, actual in zip(want, got, strict=True):
        for name, value in expected.items():
            np.testing.assert_allclose(actual[name], value, rtol=1e-4, atol=1e-5)


def _regressions() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.onnx"))


@pytest.mark.parametrize("path", _regressions(), ids=lambda p: p.stem)
def test_saved_fuzz_failures_now_pass(path: Path) -> None:
    target = path.stem.rsplit("-", 1)[0]
    assert target in fuzzing.targets(DEFAULT_PASSES), f"{path.name} names no pass or recipe"
    proto = onnx.load(str(path))
    assert fuzzing.is_valid(proto)
    assert fuzzing.check_model(proto, DEFAULT_PASSES, names=[target]) == []


def test_campaign_script_reports_and_saves(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "fuzz_passes.py"
    done = subprocess.run(
        [sys.executable, str(script), "--examples", "2", "--seed", "11", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "2 graphs, 0 failures"
    proto = fuzzing.random_model(11)
    failure = fuzzing.Failure("fold_constants", "parity", "x")
    path = fuzzing.save_failure(failure, proto.SerializeToString(), tmp_path)
    assert path.parent == tmp_path and path.stem.rsplit("-", 1)[0] == "fold_constants"
    assert onnx.load(str(path)) == proto
