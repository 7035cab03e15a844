"""graph_passes/target/kernel_timing.py and Target.measure_rewrite: a fused form is timed
against the nodes it replaces, declined only when measured slower, and each fusion pass
respects that.

The real measurements here use forms whose costs differ by orders of magnitude (a Relu
against a chain of 256x256 MatMuls), so their verdicts do not depend on machine noise. The
pass tests replace the measurement with a fake that answers by op type, so they check the
decision logic exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fusions.attention import FuseAttention
from graph_passes.fusions.bias_gelu import FuseBiasGelu
from graph_passes.fusions.gelu import FuseGelu
from graph_passes.fusions.skip_layer_norm import FuseSkipLayerNorm
from graph_passes.shapes import infer_shapes
from graph_passes.target import kernel_timing, timing_store
from graph_passes.target.kernel_timing import KernelCheck, check_rewrite
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, assert_parity, model_from_text, op_list
from pipeline import fusion_report
from pipeline.fusion_report import FusionRow, _row, kernel_timing_rows
from pipeline.runtime import machine

OPSETS = {"": 17}
TIMED = Target("cpu", time_kernels=True)


def _chain(text: str) -> tuple[ir.Model, list[ir.Node]]:
    model = model_from_text(text)
    return model, list(model.graph)


def _heavy_and_light(width: int = 256) -> tuple[list[ir.Node], ir.Value, list[ir.Node], ir.Value]:
    """A Relu (light) and eight chained width x width MatMuls (heavy) on the same input."""
    steps = "\n".join(f"  h{i + 1} = MatMul(h{i}, w{i})" for i in range(8))
    model, nodes = _chain(
        f"""<ir_version: 9, opset_import: ["" : 17]>
        g (float[N, S, {width}] h0) => (float[N, S, {width}] h8, float[N, S, {width}] r) {{
        {steps}
          r = Relu(h0)
        }}"""
    )
    rng = np.random.default_rng(0)
    for i in range(8):
        value = ir.Value(name=f"w{i}", const_value=ir.tensor(rng.random((width, width), "f")))
        model.graph.register_initializer(value)
        nodes[i].replace_input_with(1, value)
    heavy, light = nodes[:8], nodes[8:]
    return heavy, heavy[-1].outputs[0], light, light[0].outputs[0]


def test_a_much_heavier_fused_form_is_declined() -> None:
    heavy, heavy_out, light, light_out = _heavy_and_light()
    check = check_rewrite(light, [light_out], heavy, [heavy_out], OPSETS)
    assert check.verdict == "slower" and check.declined
    assert check.ratio > 2 and check.shape == "1x128x256"
    assert "MatMul" in check.fused and check.replaced == "Relu"


def test_a_much_lighter_fused_form_is_kept() -> None:
    heavy, heavy_out, light, light_out = _heavy_and_light(width=192)
    check = check_rewrite(heavy, [heavy_out], light, [light_out], OPSETS)
    assert check.verdict == "faster" and not check.declined and check.ratio < 0.5


@pytest.fixture
def measured(monkeypatch, tmp_path) -> list:
    """An empty timing store of its own; each real ``_measure`` call is listed."""
    monkeypatch.setenv("OVO_CACHE_DIR", str(tmp_path))
    calls: list = []
    real = kernel_timing._measure

    def counting(original, candidate, threads, shadows):
        calls.append(candidate.signature)
        return real(original, candidate, threads, shadows)

    monkeypatch.setattr(kernel_timing, "_measure", counting)
    return calls


def test_same_structure_is_measured_once(measured) -> None:
    checks, calls = [], []
    for _ in range(2):  # fresh weights each time: the key is the structure
        heavy, heavy_out, light, light_out = _heavy_and_light(width=64)
        checks.append(check_rewrite(light, [light_out], heavy, [heavy_out], OPSETS))
        calls.append(len(measured))
    # The first check measures (more than one attempt when the machine is noisy); the second
    # answers from what the first decided.
    assert calls[0] >= 1 and calls[1] == calls[0] and checks[1].attempts == 0
    assert not any(c.stored for c in checks), "measured in this run, not from an earlier one"


def test_a_later_run_reuses_the_stored_verdict(measured) -> None:
    """A new process (a fresh store object) on the same machine answers from the file."""
    heavy, heavy_out, light, light_out = _heavy_and_light(width=64)
    first = check_rewrite(light, [light_out], heavy, [heavy_out], OPSETS)
    calls = len(measured)  # one, or more attempts when the machine is noisy
    timing_store._stores.clear()
    again = check_rewrite(light, [light_out], heavy, [heavy_out], OPSETS)
    # Whatever the verdict (a loaded machine can turn "slower" into "same"), it is reused.
    assert len(measured) == calls
    assert again == dataclasses.replace(first, stored=True, attempts=0) and not first.stored
    assert len(list(timing_store.store_path().parent.glob("*.json"))) == 1


def test_the_first_stored_verdict_wins(tmp_path) -> None:
    """Two runs that measured the same structure at once both use the first one stored."""
    path = tmp_path / "t.json"
    one, other = timing_store.TimingStore(path), timing_store.TimingStore(path)
    assert one.remember("k", (1.2, 9, "slower", 0.03)) == (1.2, 9, "slower", 0.03)
    assert other.remember("k", (1.05, 9, "same", 0.02)) == (1.2, 9, "slower", 0.03)
    assert timing_store.TimingStore(path).get("k") == (1.2, 9, "slower", 0.03)


def test_a_broken_or_unwritable_store_is_ignored(tmp_path, caplog) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    store = timing_store.TimingStore(broken)
    assert store.get("k") is None
    assert store.remember("k", (0.9, 9, "same", 0.01)) == (0.9, 9, "same", 0.01)  # rewritten
    assert timing_store.TimingStore(broken).get("k") == (0.9, 9, "same", 0.01)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    store = timing_store.TimingStore(blocked / "kernel_timing" / "t.json")
    assert store.remember("k", (0.9, 9, "same", 0.01)) == (0.9, 9, "same", 0.01)
    assert "not written" in caplog.text


def test_the_store_is_per_machine_identity(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("OVO_CACHE_DIR", str(tmp_path))
    here = timing_store.store_path()
    cpu = machine.cpu()
    other_flags = machine.Cpu(cpu.model, cpu.flags | {"avx512_vnni_test"})
    monkeypatch.setattr(machine, "cpu", lambda: other_flags)
    assert timing_store.store_path() != here, "same model name, other features: another file"
    monkeypatch.setattr(machine, "cpu", lambda: machine.Cpu("another CPU", cpu.flags))
    assert timing_store.store_path() != here and here.parent == tmp_path / "kernel_timing"


@pytest.mark.parametrize(
    ("ratios", "verdict"),
    [
        ([1.0] * 9, "same"),
        ([1.5] * 9, "slower"),
        ([0.5] * 9, "faster"),
        ([1.08] * 9, "same"),  # within the 10% margin: a near-tie keeps the fusion
        ([0.8, 0.9, 0.95, 1.05, 1.06, 1.07, 1.2, 1.3, 1.4], "same"),  # rounds disagree
        ([1.15, 1.16, 1.14, 1.2, 1.17, 0.99, 1.18, 1.15, 1.3], "slower"),
    ],
)
def test_verdict_needs_margin_and_agreement(ratios: list[float], verdict: str) -> None:
    assert kernel_timing._verdict(ratios) == verdict


def test_unknown_rank_is_unmeasured_and_keeps_the_fusion() -> None:
    _, nodes = _chain(
        """<ir_version: 9, opset_import: ["" : 17]>
        g (float x) => (float y) { y = Relu(x) }"""
    )
    nodes[0].inputs[0].shape = None
    check = check_rewrite(nodes, [nodes[0].outputs[0]], nodes, [nodes[0].outputs[0]], OPSETS)
    assert check.verdict == "unmeasured" and "rank" in check.reason and not check.declined


def test_subgraph_is_unmeasured() -> None:
    _, nodes = _chain(
        """<ir_version: 9, opset_import: ["" : 17]>
        g (bool c, float[2] x) => (float[2] y) {
          y = If(c) <then_branch = t () => (float[2] a) { a = Relu(x) },
                     else_branch = e () => (float[2] b) { b = Neg(x) }>
        }"""
    )
    out = nodes[0].outputs[0]
    check = check_rewrite(nodes, [out], nodes, [out], OPSETS)
    assert check.verdict == "unmeasured" and "subgraph" in check.reason


def test_shape_computed_outside_the_pattern_is_cut_out_with_it() -> None:
    """A Reshape target built from Shape(x) outside the pattern: random integers would break
    it, so the shape arithmetic comes along and the sizes follow from x."""
    model, nodes = _chain(
        """<ir_version: 9, opset_import: ["" : 17]>
        g (float[N, S, 64] x) => (float[N, S, 8, 8] y, float[N, S, 8, 8] z)
        <int64[1] zero = {0}, int64[1] two = {2}, int64[1] eight = {8}> {
          shape = Shape(x)
          lead = Slice(shape, zero, two)
          full = Concat<axis=0>(lead, eight, eight)
          y = Reshape(x, full)
          r = Relu(x)
          z = Reshape(r, full)
        }"""
    )
    infer_shapes(model)
    reshape, relu_reshape = [nodes[3]], nodes[4:]
    check = check_rewrite(
        reshape, [reshape[0].outputs[0]], relu_reshape, [relu_reshape[-1].outputs[0]], OPSETS
    )
    assert check.ratio is not None, check.reason


def test_mask_bias_with_anonymous_dims_is_measured() -> None:
    """ONNX inference leaves a computed [B, 1, S, S] mask bias as four anonymous dims; the
    retry gives dims that only feed broadcasting ops size 1."""
    _, nodes = _chain(
        """<ir_version: 9, opset_import: ["" : 17]>
        g (float[N, 4, S, S] scores, float[a, b, c, d] bias) => (float[N, 4, S, S] p) {
          t = Add(scores, bias)
          p = Softmax<axis=-1>(t)
        }"""
    )
    for dim_owner in nodes[0].inputs[1:]:
        dim_owner.shape = ir.Shape([ir.SymbolicDim(f"unk__{i}") for i in range(4)])
    out = nodes[-1].outputs[0]
    check = check_rewrite(nodes, [out], nodes, [out], OPSETS)
    assert check.ratio is not None, check.reason


def test_anonymous_dims_take_the_size_of_another_input_on_that_axis() -> None:
    """ViT's embedding sum: a [?, ?, 8] Concat output plus a [1, 5, 8] position table. Both
    sides must be cut at 5 tokens (SkipLayerNorm rejects a skip of another length)."""
    model, nodes = _chain(
        """<ir_version: 9, opset_import: ["" : 17]>
        g (float[a, b, 8] x) => (float[a, b, 8] y) <float[1, 5, 8] pos = {"""
        + ", ".join(["0.5"] * 40)
        + """}> {
          y = Add(x, pos)
        }"""
    )
    nodes[0].inputs[0].shape = ir.Shape([ir.SymbolicDim("unk__1"), ir.SymbolicDim("unk__2"), 8])
    out = nodes[0].outputs[0]
    check = check_rewrite(nodes, [out], nodes, [out], OPSETS)
    assert check.ratio is not None and check.shape == "1x5x8", check


def test_an_unrelated_weight_does_not_size_the_inputs() -> None:
    """Regression: hints were taken by (rank, axis) from any input of the cut, so a packed
    attention's 384 x 1152 weight made the rank-2 mask's batch 384 and sequence 1152, and
    the cut's inputs (and ORT's memory on MiniLM's dynamo export) grew 1000-fold."""
    model, nodes = _chain(
        """<ir_version: 9, opset_import: ["" : 17]>
        g (float[batch, sequence] m, float[batch, sequence, 8] x)
            => (float[batch, sequence] r, float[batch, sequence, 24] y) {
          r = Relu(m)
          y = MatMul(x, w)
        }"""
    )
    weight = ir.Value(name="w", const_value=ir.tensor(np.ones((8, 24), "f")))
    model.graph.register_initializer(weight)
    nodes[1].replace_input_with(1, weight)
    outs = [nodes[0].outputs[0], nodes[1].outputs[0]]
    check = check_rewrite(nodes, outs, nodes, outs, OPSETS)
    assert check.ratio is not None and check.shape == "1x128x8", check


def test_an_input_too_large_to_time_is_unmeasured() -> None:
    _, nodes = _chain(
        """<ir_version: 9, opset_import: ["" : 17]>
        g (float[N, 4096, 8192] x) => (float[N, 4096, 8192] y) { y = Relu(x) }"""
    )
    out = nodes[0].outputs[0]
    check = check_rewrite(nodes, [out], nodes, [out], OPSETS)
    assert check.verdict == "unmeasured" and "too large" in check.reason, check


def test_dims_proven_by_the_pass_are_used() -> None:
    """A value ONNX inference knows nothing about (behind a contrib op) gets the dims the
    pass proved, by id of the value."""
    _, nodes = _chain(
        """<ir_version: 9, opset_import: ["" : 17]>
        g (float x, float[N, S, 8] s) => (float[N, S, 8] y) { y = Add(x, s) }"""
    )
    x = nodes[0].inputs[0]
    x.shape = None
    out = nodes[0].outputs[0]
    assert check_rewrite(nodes, [out], nodes, [out], OPSETS).verdict == "unmeasured"
    proven = {id(x): ("N", "S", 8)}
    check = check_rewrite(nodes, [out], nodes, [out], OPSETS, shapes=proven)
    assert check.ratio is not None and check.shape == "1x128x8", check


def test_target_measures_only_a_timed_cpu_target() -> None:
    heavy, heavy_out, light, light_out = _heavy_and_light(width=64)
    for target in (Target("cpu"), Target("cuda", time_kernels=True)):
        assert target.measure_rewrite(light, [light_out], heavy, [heavy_out]) is None
        assert target.rewrite_pays(light, [light_out], heavy, [heavy_out])
        assert target.kernel_checks == []
    timed = Target("cpu", time_kernels=True)
    assert not timed.rewrite_pays(light, [light_out], heavy, [heavy_out])
    assert [c.verdict for c in timed.kernel_checks] == ["slower"]


# -- the passes obey the measurement ---------------------------------------------------------


@pytest.fixture
def slower(monkeypatch, tmp_path):
    """Fake timings: ``slower[op] = ratio`` for the fused op named as the report names it
    ("com.microsoft.Gelu" and the standard "Gelu" are different); anything else 0.8. The
    timing store is an empty one of the test's own."""
    monkeypatch.setenv("OVO_CACHE_DIR", str(tmp_path))
    ratios: dict[str, float] = {}

    def fake(original, candidate, threads, shadows):
        for op, ratio in ratios.items():
            if f"|{op}[" in "|" + candidate.signature:
                return ratio, 9, kernel_timing._verdict([ratio] * 9), 0.0
        return 0.8, 9, "faster", 0.0

    monkeypatch.setattr(kernel_timing, "_measure", fake)
    return ratios


SKIP_LN = """<ir_version: 9, opset_import: ["" : 17]>
g (float[N, S, 4] a, float[N, S, 4] b) => (float[N, S, 4] z)
<float[4] gamma = {0.5, -1.0, 2.0, 1.5}, float[4] beta = {0.1, 0.2, -0.3, 0.0}> {
  s = Add(a, b)
  z = LayerNormalization<axis=-1, epsilon=0.001>(s, gamma, beta)
}"""


def test_skip_layer_norm_measured_slower_is_left_unfused(slower) -> None:
    slower["com.microsoft.SkipLayerNormalization"] = 2.5
    model = model_from_text(SKIP_LN)
    pass_ = FuseSkipLayerNorm(Target("cpu", time_kernels=True))
    candidate, result = apply_pass(pass_, model)
    assert not result.modified and (pass_.matches, pass_.declined) == (0, 1)
    assert op_list(candidate) == ["Add", "LayerNormalization"]
    assert pass_.target.kernel_checks[0].replaced == "Add, LayerNormalization"
    apply_pass(pass_, candidate)  # the next fixed-point iteration matches it again
    assert pass_.declined == 1 and len(pass_.target.kernel_checks) == 1, "reported once"


def test_each_declined_pattern_is_reported_even_with_unnamed_nodes(slower) -> None:
    """Two residual LayerNorms whose nodes have no names are two patterns in the report."""
    slower["com.microsoft.SkipLayerNormalization"] = 2.5
    model = model_from_text(
        """<ir_version: 9, opset_import: ["" : 17]>
        g (float[N, S, 4] a, float[N, S, 4] b) => (float[N, S, 4] z2)
        <float[4] gamma = {0.5, -1.0, 2.0, 1.5}, float[4] beta = {0.1, 0.2, -0.3, 0.0}> {
          s1 = Add(a, b)
          z1 = LayerNormalization<axis=-1, epsilon=0.001>(s1, gamma, beta)
          s2 = Add(z1, b)
          z2 = LayerNormalization<axis=-1, epsilon=0.001>(s2, gamma, beta)
        }"""
    )
    assert not any(node.name for node in model.graph)
    pass_ = FuseSkipLayerNorm(Target("cpu", time_kernels=True))
    candidate, _ = apply_pass(pass_, model)
    apply_pass(pass_, candidate)
    assert len(pass_.target.kernel_checks) == 2


def test_skip_layer_norm_measured_same_is_fused(slower) -> None:
    slower["com.microsoft.SkipLayerNormalization"] = 1.01
    pass_ = FuseSkipLayerNorm(Target("cpu", time_kernels=True))
    candidate, result = apply_pass(pass_, model_from_text(SKIP_LN))
    assert result.modified and op_list(candidate) == ["SkipLayerNormalization"]


BIAS_GELU = """<ir_version: 9, opset_import: ["" : 20]>
g (float[N, S, 4] x) => (float[N, S, 4] y) <float[4] bias = {0.1, 0.2, -0.3, 0.0}> {
  t = Add(x, bias)
  y = Gelu(t)
}"""


def test_bias_gelu_measured_slower_is_left_unfused(slower) -> None:
    slower["com.microsoft.BiasGelu"] = 1.2
    pass_ = FuseBiasGelu(Target("cpu", time_kernels=True))
    candidate, result = apply_pass(pass_, model_from_text(BIAS_GELU))
    assert not result.modified and pass_.declined == 1
    assert op_list(candidate) == ["Add", "Gelu"]


ERF_GELU = """<ir_version: 9, opset_import: ["" : {opset}]>
g (float[N, S, 4] x) => (float[N, S, 4] y)
<float s = {{1.4142135}}, float one = {{1.0}}, float half = {{0.5}}> {{
  d = Div(x, s)
  e = Erf(d)
  p = Add(e, one)
  m = Mul(x, p)
  y = Mul(m, half)
}}"""


@pytest.mark.parametrize(
    ("opset", "ops"), [(20, ["Gelu"]), (17, ["Div", "Erf", "Add", "Mul", "Mul"])]
)
def test_gelu_contrib_measured_slower_falls_back_to_standard_gelu(slower, opset, ops) -> None:
    slower["com.microsoft.Gelu"] = 1.5
    model = model_from_text(ERF_GELU.format(opset=opset))
    pass_ = FuseGelu(Target("cpu", time_kernels=True))
    candidate, _ = apply_pass(pass_, model)
    assert op_list(candidate) == ops
    assert pass_.blocked == 0  # left on purpose, not for want of an op
    assert_parity(model, candidate, rtol=1e-5, atol=1e-6)


def _attention_model() -> ir.Model:
    from tests.passes.test_fuse_attention import attention  # the hand-built encoder layer

    return attention("sdpa", "mul")


@pytest.mark.parametrize(
    ("timings", "op"),
    [
        ((1.3, 0.9), "MultiHeadAttention"),
        ((0.7, 0.9), "Attention"),
        ((0.85, 0.7), "MultiHeadAttention"),
        ((1.3, 1.3), None),
    ],
)
def test_attention_takes_the_fastest_form_that_pays(slower, timings, op) -> None:
    slower["com.microsoft.Attention"], slower["com.microsoft.MultiHeadAttention"] = timings
    model = _attention_model()
    pass_ = FuseAttention(Target("cpu", time_kernels=True))
    candidate, _ = apply_pass(pass_, model)
    fused = [n.op_type for n in candidate.graph if n.domain == "com.microsoft"]
    assert fused == ([] if op is None else [op])
    assert pass_.declined == (op is None)
    assert [c.fused for c in pass_.target.kernel_checks] == [
        "com.microsoft.Attention",
        "com.microsoft.MultiHeadAttention",
    ]
    if op is None:  # nothing left behind: no uses by the discarded candidates
        assert op_list(candidate) == op_list(model.clone())
        assert all(u.node.graph is not None for v in candidate.graph.inputs for u in v.uses())


# -- the report ------------------------------------------------------------------------------


def _check(verdict: str, ratio: float = 2.0) -> KernelCheck:
    return KernelCheck(
        "com.microsoft.SkipLayerNormalization",
        "Add, LayerNormalization",
        "1x128x384",
        ratio,
        9,
        verdict,
    )


def test_declined_fusions_are_explained_not_warned() -> None:
    row = _row("skip_layernorm", 12, 0, "residual LayerNorms", slower=[_check("slower")] * 24)
    assert isinstance(row, FusionRow)
    assert (row.shortfall, row.declined, row.unexplained) == (12, 12, 0)
    assert "12 left out on purpose" in row.note and "2.00x the time" in row.note
    partly = _row("skip_layernorm", 12, 0, "residual LayerNorms", slower=[_check("slower")] * 5)
    assert partly.unexplained == 7


def test_kernel_timing_rows_count_the_patterns_each_measurement_decided() -> None:
    rows = kernel_timing_rows([_check("slower")] * 3 + [_check("same", 1.0)])
    assert [(r["verdict"], r["patterns"]) for r in rows] == [("slower", 3), ("same", 1)]


@pytest.mark.parametrize("fusion", [FuseGelu, FuseBiasGelu, FuseSkipLayerNorm])
def test_the_original_side_runs_without_the_ort_fusions_the_fusion_shadows(
    monkeypatch, tmp_path, fusion
) -> None:
    """The unfused side is timed as it really runs: with the ORT transformers that would
    build the same fused op turned off, as the fusion declares in ``shadows``."""
    monkeypatch.setenv("OVO_CACHE_DIR", str(tmp_path))
    seen: list = []

    def fake(original, candidate, threads, shadows):
        seen.append(tuple(shadows))
        return 0.8, 9, "faster", 0.0

    monkeypatch.setattr(kernel_timing, "_measure", fake)
    text = {
        FuseGelu: ERF_GELU.format(opset=20),
        FuseBiasGelu: BIAS_GELU,
        FuseSkipLayerNorm: SKIP_LN,
    }[fusion]
    apply_pass(fusion(Target("cpu", time_kernels=True)), model_from_text(text))
    assert seen and set(seen) == {fusion.shadows}
    assert fusion.shadows  # each of these has an ORT counterpart


# -- noisy measurements (issue 15): only a clean verdict decides or is stored ----------------

RELU = """<ir_version: 9, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 8] y) { y = Relu(x) }"""
NOISY = np.random.default_rng(0).lognormal(0.0, 0.4, 21)  # rounds that disagree wildly
QUIET_SAME = 1.0 + np.linspace(-0.01, 0.01, 21)
QUIET_SLOWER = 1.5 + np.linspace(-0.01, 0.01, 21)
NOISY_SLOWER = 2.0 * np.random.default_rng(1).lognormal(0.0, 0.3, 21)  # decisive anyway


@pytest.fixture
def rounds(monkeypatch, tmp_path) -> list:
    """Injected noise: each real ``_measure`` takes its per-round fused/original ratios from
    the list the test fills (one array per measurement, in order); the sessions are real.
    An empty timing store of the test's own. The list is emptied as measurements are made."""
    monkeypatch.setenv("OVO_CACHE_DIR", str(tmp_path))
    script: list = []

    def scripted(samplers, count, runs, done=None):
        ratios = script.pop(0)
        return [np.ones(len(ratios)), np.asarray(ratios, dtype=float)]

    monkeypatch.setattr(kernel_timing, "interleaved_rounds", scripted)
    return script


def _relu_check(**options) -> KernelCheck:
    _, nodes = _chain(RELU)
    out = nodes[0].outputs[0]
    return check_rewrite(nodes, [out], nodes, [out], OPSETS, **options)


def _stored_entries() -> dict:
    path = timing_store.store_path()
    return timing_store.TimingStore(path).entries if path.exists() else {}


def test_injected_rounds_are_what_the_tests_say() -> None:
    """The premises: NOISY is a 'same' too noisy to trust, the others are clean."""
    noisy = kernel_timing._stats(NOISY)
    assert kernel_timing._verdict(NOISY) == "same" and noisy.noise >= kernel_timing.MARGIN
    assert kernel_timing._stats(QUIET_SAME).noise < kernel_timing.MARGIN
    assert kernel_timing._verdict(NOISY_SLOWER) == "slower"
    assert kernel_timing._stats(NOISY_SLOWER).noise >= kernel_timing.MARGIN


def test_a_noisy_same_is_remeasured_then_undecided_and_not_stored(rounds) -> None:
    rounds.extend([NOISY] * kernel_timing.ATTEMPTS)
    check = _relu_check()
    assert not rounds, "measured ATTEMPTS times"
    assert check.verdict == "undecided" and check.declined and not check.stored
    assert check.attempts == kernel_timing.ATTEMPTS and check.noise >= kernel_timing.MARGIN
    assert check.reason == "undecided: timing too noisy" and "too noisy" in check.describe()
    assert _stored_entries() == {}, "an undecided verdict is not stored"
    assert _relu_check().verdict == "undecided" and not rounds, "same structure, same run"
    timing_store._stores.clear()  # a later run measures again
    rounds.append(QUIET_SAME)
    assert _relu_check().verdict == "same" and not rounds


def test_a_noisy_attempt_then_a_clean_one_stores_the_clean_one(rounds) -> None:
    rounds.extend([NOISY, QUIET_SAME])
    check = _relu_check()
    assert not rounds and (check.verdict, check.attempts) == ("same", 2)
    assert check.noise < kernel_timing.MARGIN and not check.declined
    (entry,) = _stored_entries().values()
    assert entry[2:] == ["same", check.noise] and entry[0] == check.ratio


def test_a_verdict_decisive_despite_noise_is_clean(rounds) -> None:
    rounds.append(NOISY_SLOWER)
    check = _relu_check()
    assert (check.verdict, check.attempts) == ("slower", 1) and not rounds
    assert check.noise >= kernel_timing.MARGIN and len(_stored_entries()) == 1


def test_a_clean_verdict_is_stored_and_reused_without_measuring(rounds) -> None:
    rounds.append(QUIET_SAME)
    first = _relu_check()
    timing_store._stores.clear()  # a new process
    again = _relu_check()  # the script is empty: a measurement would fail
    assert again == dataclasses.replace(first, stored=True, attempts=0)
    assert first.attempts == 1 and again.noise == first.noise


def test_retime_measures_again_and_replaces_the_stored_verdict(rounds) -> None:
    rounds.append(QUIET_SAME)
    assert _relu_check().verdict == "same"
    timing_store._stores.clear()
    rounds.append(QUIET_SLOWER)
    retimed = _relu_check(retime=True)
    assert not rounds and retimed.verdict == "slower"
    assert (retimed.stored, retimed.attempts) == (False, 1)
    again = _relu_check(retime=True)  # once per process, not once per site
    assert again == dataclasses.replace(retimed, attempts=0)
    timing_store._stores.clear()
    later = _relu_check()
    assert (later.verdict, later.stored) == ("slower", True)
    (entry,) = _stored_entries().values()
    assert entry[2] == "slower"


def test_retime_that_is_undecided_keeps_the_stored_verdict_on_disk(rounds) -> None:
    rounds.append(QUIET_SAME)
    _relu_check()
    timing_store._stores.clear()
    rounds.extend([NOISY] * kernel_timing.ATTEMPTS)
    assert _relu_check(retime=True).verdict == "undecided"
    (entry,) = _stored_entries().values()
    assert entry[2] == "same"


def test_the_target_passes_retime_on(rounds) -> None:
    rounds.append(QUIET_SAME)
    _relu_check()
    timing_store._stores.clear()
    rounds.append(QUIET_SLOWER)
    _, nodes = _chain(RELU)
    out = nodes[0].outputs[0]
    target = Target("cpu", time_kernels=True, retime=True)
    assert not target.rewrite_pays(nodes, [out], nodes, [out]) and not rounds


def test_an_undecided_fusion_is_left_unfused(rounds) -> None:
    rounds.extend([NOISY] * kernel_timing.ATTEMPTS)
    pass_ = FuseSkipLayerNorm(Target("cpu", time_kernels=True))
    candidate, result = apply_pass(pass_, model_from_text(SKIP_LN))
    assert not result.modified and pass_.declined == 1
    assert op_list(candidate) == ["Add", "LayerNormalization"]
    assert [c.verdict for c in pass_.target.kernel_checks] == ["undecided"]


def test_the_report_explains_an_undecided_fusion() -> None:
    noisy = dataclasses.replace(
        _check("undecided", 1.02), noise=0.3, attempts=3, reason="undecided: timing too noisy"
    )
    (row,) = kernel_timing_rows([noisy, noisy])
    assert (row["verdict"], row["noise"], row["attempts"], row["patterns"]) == (
        "undecided",
        0.3,
        3,
        2,
    )
    assert row["reason"] == "undecided: timing too noisy"
    fusion = _row("skip_layernorm", 2, 0, "residual LayerNorms", slower=[noisy] * 2)
    assert (fusion.declined, fusion.unexplained) == (2, 0)
    assert "undecided: timing too noisy" in fusion.note


def test_an_undecided_check_is_declined_in_the_fusion_rows() -> None:
    target = Target("cpu", time_kernels=True)
    target.kernel_checks.append(dataclasses.replace(_check("undecided", 1.0), noise=0.3))
    ops = frozenset({"SkipLayerNormalization"})
    assert fusion_report._declined(target, ops) == target.kernel_checks
