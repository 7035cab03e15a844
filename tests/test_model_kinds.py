"""The CLI end to end on the kinds of models third-party users bring (models/kinds.py).

Each kind is written to a folder, optimized twice with the default recipe (the two outputs
must be byte-identical: determinism), and the output optimized again (nothing may change:
idempotence). Every run must exit 0 with parity passed, leave the input file untouched, keep
the model's signature (a named dynamic dimension must stay dynamic), and produce a model
that loads in ONNX Runtime and matches the original's outputs on inputs of our own.

Then the pitfall each kind exists for: int8 weights stay int8, a declared ``[32, 1, 8210]``
output stays exactly that, a ZipMap output keeps its ``seq(map)`` type, subgraphs listed
out of topological order are accepted. MiniLM (two exporters) is marked slow.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import kinds

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-5
Feeds = dict[str, np.ndarray]


def _save(builder: Callable[[], onnx.ModelProto]) -> Callable[[Path], None]:
    return lambda path: onnx.save(builder(), path)


def _normal(name: str, *shape: int, seed: int = 1, scale: float = 1.0) -> Feeds:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32)}


@dataclass(frozen=True)
class Kind:
    """How to build one kind of model and what inputs to check it on."""

    build: Callable[[Path], None]
    feeds: Callable[[], list[Feeds]]
    speed_check: bool = False
    reference: str | None = None  # another kind whose file gives the reference outputs


FAST_KINDS: dict[str, Kind] = {
    "old_zoo_cnn": Kind(_save(kinds.old_zoo_cnn), lambda: [_normal("data", 1, 3, 32, 32)]),
    # OCR crops: short and wide, H != W, sizes unlike the pipeline's own inputs.
    "paddle_ocr": Kind(
        _save(kinds.paddle_ocr),
        lambda: [_normal("x", 1, 3, 32, 160), _normal("x", 4, 3, 48, 40, seed=2)],
    ),
    # Positive and negative inputs, so both branches of the If are taken.
    "recurrent": Kind(
        _save(kinds.recurrent),
        lambda: [
            _normal("x", 5, 4, scale=3.0),
            {"x": np.full((5, 4), 2.0, np.float32)},
            {"x": np.full((3, 4), -2.0, np.float32)},
        ],
    ),
    "recurrent_unsorted": Kind(
        _save(lambda: kinds.recurrent(unsorted_subgraphs=True)),
        lambda: [{"x": np.full((5, 4), 2.0, np.float32)}, {"x": np.full((3, 4), -2.0, np.float32)}],
        reference="recurrent",  # ONNX Runtime rejects the unsorted original itself
    ),
    "sklearn_logreg_zipmap": Kind(_save(kinds.sklearn_logreg_zipmap), lambda: [_normal("X", 7, 4)]),
    "sklearn_scaler_forest": Kind(_save(kinds.sklearn_scaler_forest), lambda: [_normal("X", 7, 4)]),
    "quantized_static_qdq": Kind(
        kinds.quantized_static_qdq, lambda: [_normal("input", 4, 3, 16, 16)]
    ),
    "quantized_dynamic": Kind(kinds.quantized_dynamic, lambda: [_normal("input", 5, 64)]),
    "output_32_1_8210": Kind(
        _save(kinds.output_32_1_8210), lambda: [_normal("x", 32, 8210)], speed_check=True
    ),
}


def _minilm_feeds() -> list[Feeds]:
    from models.minilm import example_inputs

    return [example_inputs()]


def _minilm_build(exporter: str) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        from models.minilm import export_minilm

        export_minilm(path, exporter=exporter)

    return build


SLOW_KINDS: dict[str, Kind] = {
    "minilm_torch_legacy": Kind(_minilm_build("torch-legacy"), _minilm_feeds, speed_check=True),
    "minilm_torch_dynamo": Kind(_minilm_build("torch-dynamo"), _minilm_feeds),
}
ALL_KINDS = FAST_KINDS | SLOW_KINDS


def _params(names: list[str]) -> list:
    params = []
    for name in names:
        marks = [pytest.mark.slow] if name in SLOW_KINDS else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


# ------------------------------------------------------------------------------------------
# running the CLI


@dataclass
class KindRun:
    """One kind: its source file and the three CLI runs on it."""

    source: Path
    source_bytes: bytes
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess
    again: subprocess.CompletedProcess | None
    outputs: dict[str, Path] = field(default_factory=dict)
    # the largest resident size of any child of this test process so far (the CLI runs)
    peak_child_mib: float = 0.0

    def report(self, which: str) -> dict:
        path = self.outputs[which].with_suffix(".json")
        return json.loads(path.read_text()) if path.exists() else {}


def run_cli(source: Path, target: Path, *extra: str) -> subprocess.CompletedProcess:
    report = target.with_suffix(".json")
    args = [str(source), "-o", str(target), "--report", str(report), "-q", *extra]
    return subprocess.run(
        [sys.executable, "optimize.py", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )


def optimize_kind(folder: Path, name: str) -> KindRun:
    """Build ``name`` in ``folder``; optimize it, then (in parallel) once more and its output
    again. The second run comes after the first as a user's would: kernel-timing verdicts
    are measurements, and the timing store the first run filled is what makes the second
    write the same file (graph_passes/target/timing_store.py)."""
    kind = ALL_KINDS[name]
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"{name}.onnx"
    if not source.exists():
        kind.build(source)
    before = source.read_bytes()
    extra = () if kind.speed_check else ("--no-speed-check",)
    outputs = {k: folder / f"{name}.{k}.onnx" for k in ("first", "second", "again")}
    first = run_cli(source, outputs["first"], *extra)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pending_second = pool.submit(run_cli, source, outputs["second"], *extra)
        again = None
        if first.returncode == 0:
            again = run_cli(outputs["first"], outputs["again"], "--no-speed-check")
        second = pending_second.result()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    return KindRun(source, before, first, second, again, outputs, peak)


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KindRun]:
    folder = tmp_path_factory.mktemp("kinds")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(optimize_kind, folder, name) for name in FAST_KINDS}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="session")
def slow_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KindRun]:
    """Filled lazily: exporting MiniLM takes ~10-20 s per exporter; done once per session."""
    return {}


@pytest.fixture
def kind_run(
    request: pytest.FixtureRequest, name: str, tmp_path_factory: pytest.TempPathFactory
) -> KindRun:
    if name in FAST_KINDS:
        return request.getfixturevalue("fast_runs")[name]
    cache = request.getfixturevalue("slow_runs")
    if name not in cache:
        cache[name] = optimize_kind(tmp_path_factory.mktemp(name), name)
    return cache[name]


def _ok(run: subprocess.CompletedProcess | None) -> subprocess.CompletedProcess:
    assert run is not None, "the first run failed, so the output was not optimized again"
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    return run


# ------------------------------------------------------------------------------------------
# helpers over models


def ort_outputs(path: Path, feeds: Feeds) -> list:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(expected: list, actual: list) -> None:
    assert len(expected) == len(actual)
    for want, have in zip(expected, actual, strict=True):
        if isinstance(want, list):  # a sequence of maps (ZipMap)
            assert isinstance(have, list) and len(have) == len(want)
            for want_map, have_map in zip(want, have, strict=True):
                assert want_map.keys() == have_map.keys()
                np.testing.assert_allclose(
                    list(have_map.values()), list(want_map.values()), rtol=RTOL, atol=ATOL
                )
            continue
        assert have.dtype == want.dtype and have.shape == want.shape
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(have, want, rtol=RTOL, atol=ATOL)
        else:
            np.testing.assert_array_equal(have, want)


def signature(model: onnx.ModelProto) -> list[tuple]:
    """(kind, name, type) of the real inputs and the outputs, in order."""
    initializers = {t.name for t in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in initializers]
    return [("input", i.name, i.type) for i in real_inputs] + [
        ("output", o.name, o.type) for o in model.graph.output
    ]


def assert_signature_kept(original: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    """Same names and element types; a declared dim (number or name) must not change."""
    before, after = signature(original), signature(optimized)
    assert [(k, n) for k, n, _ in before] == [(k, n) for k, n, _ in after]
    for (kind, name, want), (_, _, have) in zip(before, after, strict=True):
        if not want.HasField("tensor_type"):
            assert have == want, f"{kind} {name}: type {want} became {have}"
            continue
        assert have.tensor_type.elem_type == want.tensor_type.elem_type, (kind, name)
        if not want.tensor_type.HasField("shape"):
            continue
        want_dims, have_dims = want.tensor_type.shape.dim, have.tensor_type.shape.dim
        assert len(have_dims) == len(want_dims), f"{kind} {name}: rank changed"
        for axis, (w, h) in enumerate(zip(want_dims, have_dims, strict=True)):
            if w.HasField("dim_value"):
                assert h.dim_value == w.dim_value, f"{kind} {name} dim {axis}: {w} -> {h}"
            elif w.HasField("dim_param"):
                assert h.dim_param == w.dim_param, f"{kind} {name} dim {axis}: {w} -> {h}"


def op_histogram(model: onnx.ModelProto) -> collections.Counter:
    counts: collections.Counter = collections.Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[(node.domain, node.op_type)] += 1
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    visit(sub)

    visit(model.graph)
    return counts


# ------------------------------------------------------------------------------------------
# every kind


@pytest.mark.parametrize("name", _params(list(ALL_KINDS)))
def test_optimized_verified_and_equal_to_the_original(name: str, kind_run: KindRun) -> None:
    _ok(kind_run.first)
    report = kind_run.report("first")
    assert report["status"] == "ok" and report["exit_code"] == 0
    assert report["parity"]["passed"] is True
    assert report["rolled_back"] == {}, f"passes rolled back: {report['rolled_back']}"
    assert kind_run.source.read_bytes() == kind_run.source_bytes  # input untouched

    out = kind_run.outputs["first"]
    optimized = onnx.load(out)
    onnx.checker.check_model(optimized, full_check=True)
    assert_signature_kept(onnx.load(kind_run.source), optimized)
    reference_kind = ALL_KINDS[name].reference
    reference = kind_run.source
    if reference_kind is not None:
        reference = kind_run.source.with_name(f"{reference_kind}.onnx")
        if not reference.exists():
            ALL_KINDS[reference_kind].build(reference)
    for feeds in ALL_KINDS[name].feeds():
        assert_same_outputs(ort_outputs(reference, feeds), ort_outputs(out, feeds))


def _skip_if_undecided(kind_run: KindRun) -> None:
    """An undecided kernel timing (too noisy on every attempt) is not stored, so a later run
    measures it again and may decide it: byte-identity then cannot hold, by design
    (graph_passes/target/kernel_timing.py). Said as a skip, never passed silently."""
    rows = kind_run.report("first").get("kernel_timing") or []
    undecided = [f"{r['fused']} vs {r['replaced']}" for r in rows if r["verdict"] == "undecided"]
    if undecided:
        pytest.skip(f"kernel timing undecided under this machine's load: {undecided}")


@pytest.mark.parametrize("name", _params(list(ALL_KINDS)))
def test_two_runs_give_byte_identical_files(name: str, kind_run: KindRun) -> None:
    _ok(kind_run.first)
    _ok(kind_run.second)
    _skip_if_undecided(kind_run)
    assert kind_run.outputs["first"].read_bytes() == kind_run.outputs["second"].read_bytes()


@pytest.mark.parametrize("name", _params(list(ALL_KINDS)))
def test_optimizing_the_output_again_changes_nothing(name: str, kind_run: KindRun) -> None:
    _ok(kind_run.first)
    _ok(kind_run.again)
    _skip_if_undecided(kind_run)
    report = kind_run.report("again")
    modified = [p["name"] for p in report["passes"] if p["modified"]]
    assert modified == [], f"passes still changed the optimized model: {modified}"
    first, again = (onnx.load(kind_run.outputs[k]) for k in ("first", "again"))
    assert op_histogram(again) == op_histogram(first)
    assert kind_run.outputs["again"].read_bytes() == kind_run.outputs["first"].read_bytes()


MEMORY_BUDGET_MIB = 3 * 1024


@pytest.mark.parametrize("name", _params(list(ALL_KINDS)))
def test_optimizing_stays_within_memory(name: str, kind_run: KindRun) -> None:
    """The CLI's peak resident size (largest child so far, so an upper bound for this kind).
    MiniLM needs about 0.8 GiB; a kernel-timing cut once sized its inputs from an unrelated
    weight and took 24 GiB, which the CI machine answered by killing the run."""
    _ok(kind_run.first)
    assert kind_run.peak_child_mib < MEMORY_BUDGET_MIB, f"{kind_run.peak_child_mib:.0f} MiB"


# ------------------------------------------------------------------------------------------
# the pitfall each kind is here for

QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
}


@pytest.mark.parametrize("name", _params(["quantized_static_qdq", "quantized_dynamic"]))
def test_int8_models_keep_their_int8_weights(name: str, kind_run: KindRun) -> None:
    _ok(kind_run.first)
    original, optimized = onnx.load(kind_run.source), onnx.load(kind_run.outputs["first"])
    quantized = {k: v for k, v in op_histogram(original).items() if k[1] in QUANTIZED_OPS}
    assert quantized, "the test model is not quantized"
    assert {k: v for k, v in op_histogram(optimized).items() if k[1] in QUANTIZED_OPS} == (
        quantized
    )
    # the int8 weights are all still there (identical scalar zero points may be merged) ...
    assert _int8_weights(optimized) == _int8_weights(original)
    # ... and no float copy of them appeared (a folded DequantizeLinear)
    assert _tensor_bytes(optimized, onnx.TensorProto.FLOAT) <= _tensor_bytes(
        original, onnx.TensorProto.FLOAT
    )


@pytest.mark.parametrize("name", ["quantized_static_qdq", "quantized_dynamic"])
def test_int8_output_file_is_no_larger_than_the_input(name: str, kind_run: KindRun) -> None:
    _ok(kind_run.first)
    assert kind_run.outputs["first"].stat().st_size <= kind_run.source.stat().st_size


def _int8_weights(model: onnx.ModelProto) -> list[tuple[int, list[int]]]:
    int8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sorted(
        (t.data_type, list(t.dims))
        for t in model.graph.initializer
        if t.data_type in int8 and np.prod(t.dims) > 1
    )


def _tensor_bytes(model: onnx.ModelProto, data_type: int) -> int:
    return sum(
        onnx.numpy_helper.to_array(t).nbytes
        for t in model.graph.initializer
        if t.data_type == data_type
    )


@pytest.mark.parametrize("name", _params(["output_32_1_8210"]))
def test_output_shape_32_1_8210_is_kept_declared_and_actual(name: str, kind_run: KindRun) -> None:
    _ok(kind_run.first)
    out = kind_run.outputs["first"]
    declared = onnx.load(out).graph.output[0].type.tensor_type.shape
    assert [d.dim_value for d in declared.dim] == kinds.OUTPUT_32_1_8210
    assert all(d.HasField("dim_value") for d in declared.dim)
    (actual,) = ort_outputs(out, FAST_KINDS[name].feeds()[0])
    assert list(actual.shape) == kinds.OUTPUT_32_1_8210
    report = kind_run.report("first")
    assert report["output_model"]["outputs"][0]["shape"] == kinds.OUTPUT_32_1_8210
    # the default recipe has something to do here (no-ops), so the speed check ran
    assert report["output_model"]["nodes"] < report["input_model"]["nodes"]
    assert report["latency"] is not None and report["latency"]["verdict"] != "slower"


@pytest.mark.parametrize("name", _params(["sklearn_logreg_zipmap"]))
def test_zipmap_output_keeps_its_sequence_of_maps_type(name: str, kind_run: KindRun) -> None:
    # Another tool wrote this output back as a tensor of element type 0, which ONNX Runtime
    # refuses with "Invalid tensor data type 0".
    _ok(kind_run.first)
    original, optimized = onnx.load(kind_run.source), onnx.load(kind_run.outputs["first"])
    assert [o.type for o in optimized.graph.output] == [o.type for o in original.graph.output]
    assert optimized.graph.output[1].type.HasField("sequence_type")
    session = ort.InferenceSession(
        str(kind_run.outputs["first"]), providers=["CPUExecutionProvider"]
    )
    assert session.get_outputs()[1].type == "seq(map(int64,tensor(float)))"


@pytest.mark.parametrize("name", _params(["recurrent_unsorted"]))
def test_unsorted_subgraphs_are_accepted_and_sorted(name: str, kind_run: KindRun) -> None:
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(str(kind_run.source))  # the test model really is unsorted
    _ok(kind_run.first)
    optimized = onnx.load(kind_run.outputs["first"])
    onnx.checker.check_model(optimized, full_check=True)  # sorted now, subgraphs included
    assert {op for _, op in op_histogram(optimized)} >= {"Loop", "If"}


@pytest.mark.parametrize("name", _params(["old_zoo_cnn"]))
def test_old_zoo_model_keeps_ir3_inputs_runnable(name: str, kind_run: KindRun) -> None:
    # IR 3 lists every initializer as a graph input too; the optimized model must still run
    # when only the real input is fed. The IR version is raised to 4 (which only drops the
    # rule that initializers must be inputs, so passes can add weights), and the report says so.
    _ok(kind_run.first)
    optimized = onnx.load(kind_run.outputs["first"])
    assert [n for k, n, _ in signature(optimized) if k == "input"] == ["data"]
    initializers = {t.name for t in optimized.graph.initializer}
    assert {i.name for i in optimized.graph.input} - initializers == {"data"}
    assert optimized.ir_version == 4
    warnings = kind_run.report("first")["warnings"]
    assert any("IR version 3 raised to 4" in w for w in warnings)
    # The weights listed as inputs became plain weights, so BatchNormalization folded away.
    assert [i.name for i in optimized.graph.input] == ["data"]
    assert any("listed as graph inputs" in w for w in warnings)
    assert op_histogram(optimized)[("", "BatchNormalization")] == 0
    assert op_histogram(onnx.load(kind_run.source))[("", "BatchNormalization")] == 2


def test_keep_initializer_inputs_keeps_them_and_leaves_batchnorm(tmp_path: Path) -> None:
    source, target = tmp_path / "old.onnx", tmp_path / "old.opt.onnx"
    onnx.save(kinds.old_zoo_cnn(), source)
    proc = run_cli(source, target, "--keep-initializer-inputs", "--no-speed-check")
    assert proc.returncode == 0, proc.stderr
    optimized = onnx.load(target)
    assert len(optimized.graph.input) == len(onnx.load(source).graph.input) > 1
    assert op_histogram(optimized)[("", "BatchNormalization")] == 2


@pytest.mark.parametrize("name", _params(list(SLOW_KINDS)))
def test_minilm_export_matches_pytorch(name: str, kind_run: KindRun) -> None:
    # The exported file itself must be right, or "equal to the original" proves little.
    import torch

    from models.minilm import INPUT_NAMES, example_inputs, load_torch_model

    feeds = example_inputs()
    assert (feeds["attention_mask"] == 0).any()  # real padding in the batch
    with torch.no_grad():
        expected = load_torch_model()(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES))
    (actual,) = ort_outputs(kind_run.source, feeds)
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-3, atol=1e-4)
    graph = onnx.load(kind_run.source, load_external_data=False).graph
    assert [i.name for i in graph.input] == list(INPUT_NAMES)
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert all(d[0] and d[1] for d in dims), f"batch and sequence must be dynamic: {dims}"
