"""Structured FFN pruning on tiny models built here: blocks found by structure in every form
(exported GELU, fused BiasGelu, SwiGLU, packed gate/up + Split), shapes that stay consistent,
the refit that lowers block error, the guard's search, composition with quantization.

Weights are random from a fixed seed, except where a test needs structure it can predict:
duplicated up-projection columns (a removed channel the kept ones can stand in for), dead
channels with large weights (importance must come from activations, not weight magnitude).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.match import all_names
from pipeline.pruning import ffn, importance, moments, reconstruct, spec
from pipeline.pruning.graph import Rewrite
from pipeline.pruning.stage import Point, check_interface, largest_within
from pipeline.runtime.errors import VerificationFailed
from tests.test_cli import run_cli

HIDDEN, INTER, SEQ = 16, 64, 6
MS = "com.microsoft"


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _model(nodes, inits, value_info=(), outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])],
        [
            helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", SEQ, HIDDEN])
            for o in outputs
        ],
        inits,
        value_info=list(value_info),
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def _inter_info(name: str, width: int = INTER) -> onnx.ValueInfoProto:
    """A declared ``[batch, SEQ, width]`` shape: pruning must update it, or the checker's
    strict shape inference fails."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", SEQ, width])


def gelu_block(prefix: str, x: str, out: str, rng, fused: bool, up: np.ndarray | None = None):
    """x -> MatMul -> Add(b1) -> GELU (Div/Erf/Add/Mul/Mul, or BiasGelu) -> MatMul -> Add(b2)
    -> Add(x) (the residual)."""
    p = prefix
    up = rng.standard_normal((HIDDEN, INTER)) / 4 if up is None else up
    inits = [
        _init(f"{p}w1", up),
        _init(f"{p}b1", rng.standard_normal(INTER) / 4),
        _init(f"{p}w2", rng.standard_normal((INTER, HIDDEN)) / 8),
        _init(f"{p}b2", rng.standard_normal(HIDDEN) / 8),
    ]
    nodes = [helper.make_node("MatMul", [x, f"{p}w1"], [f"{p}u"], name=f"n{p}1")]
    if fused:
        nodes.append(helper.make_node("BiasGelu", [f"{p}u", f"{p}b1"], [f"{p}h"], domain=MS))
    else:
        inits += [_init(f"{p}sqrt2", np.sqrt(2.0)), _init(f"{p}one", 1.0), _init(f"{p}half", 0.5)]
        nodes += [
            helper.make_node("Add", [f"{p}u", f"{p}b1"], [f"{p}a"]),
            helper.make_node("Div", [f"{p}a", f"{p}sqrt2"], [f"{p}d"]),
            helper.make_node("Erf", [f"{p}d"], [f"{p}e"]),
            helper.make_node("Add", [f"{p}e", f"{p}one"], [f"{p}e1"]),
            helper.make_node("Mul", [f"{p}a", f"{p}e1"], [f"{p}m"]),
            helper.make_node("Mul", [f"{p}m", f"{p}half"], [f"{p}h"]),
        ]
    nodes += [
        helper.make_node("MatMul", [f"{p}h", f"{p}w2"], [f"{p}o"], name=f"n{p}2"),
        helper.make_node("Add", [f"{p}o", f"{p}b2"], [f"{p}ob"]),
        helper.make_node("Add", [f"{p}ob", x], [out]),
    ]
    return nodes, inits, [_inter_info(f"{p}u"), _inter_info(f"{p}h")]


def swiglu_block(prefix: str, x: str, out: str, rng, packed: bool):
    """gate/up MatMuls (or one packed MatMul + Split), SiLU (Sigmoid * x, or QuickGelu),
    times up, MatMul down (no bias), + x."""
    p = prefix
    gate = rng.standard_normal((HIDDEN, INTER)) / 4
    up = rng.standard_normal((HIDDEN, INTER)) / 4
    inits = [_init(f"{p}wd", rng.standard_normal((INTER, HIDDEN)) / 8)]
    if packed:
        inits += [
            _init(f"{p}wp", np.concatenate([gate, up], axis=1)),
            numpy_helper.from_array(np.array([INTER, INTER], np.int64), f"{p}widths"),
        ]
        nodes = [
            helper.make_node("MatMul", [x, f"{p}wp"], [f"{p}gu"]),
            helper.make_node("Split", [f"{p}gu", f"{p}widths"], [f"{p}g", f"{p}u"], axis=-1),
            helper.make_node("QuickGelu", [f"{p}g"], [f"{p}s"], domain=MS, alpha=1.0),
        ]
        info = [_inter_info(f"{p}gu", 2 * INTER)]
    else:
        inits += [_init(f"{p}wg", gate), _init(f"{p}wu", up)]
        nodes = [
            helper.make_node("MatMul", [x, f"{p}wg"], [f"{p}g"]),
            helper.make_node("MatMul", [x, f"{p}wu"], [f"{p}u"]),
            helper.make_node("Sigmoid", [f"{p}g"], [f"{p}sg"]),
            helper.make_node("Mul", [f"{p}g", f"{p}sg"], [f"{p}s"]),
        ]
        info = []
    nodes += [
        helper.make_node("Mul", [f"{p}s", f"{p}u"], [f"{p}h"]),
        helper.make_node("MatMul", [f"{p}h", f"{p}wd"], [f"{p}o"]),
        helper.make_node("Add", [x, f"{p}o"], [out]),
    ]
    return nodes, inits, info + [_inter_info(f"{p}g"), _inter_info(f"{p}h")]


def build(kind: str, layers: int = 2, seed: int = 0) -> onnx.ModelProto:
    """``layers`` blocks of ``kind`` (gelu, bias_gelu, swiglu, packed) one after another."""
    rng = np.random.default_rng(seed)
    nodes, inits, info, x = [], [], [], "x"
    for layer in range(layers):
        out = "y" if layer == layers - 1 else f"r{layer}"
        if kind in ("gelu", "bias_gelu"):
            parts = gelu_block(f"l{layer}_", x, out, rng, fused=kind == "bias_gelu")
        else:
            parts = swiglu_block(f"l{layer}_", x, out, rng, packed=kind == "packed")
        nodes += parts[0]
        inits += parts[1]
        info += parts[2]
        x = out
    return _model(nodes, inits, info)


KINDS = ("gelu", "bias_gelu", "swiglu", "packed")


def feeds(count: int = 4, batch: int = 3, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)} for _ in range(count)
    ]


def prune_one(model: ir.Model, block, keep, weight, intercept=None) -> None:
    """``ffn.prune`` of one block, in one rewrite."""
    rewrite = Rewrite(model.graph, all_names(model))
    ffn.prune(rewrite, block, keep, weight, intercept)
    rewrite.finish()


def run(model: onnx.ModelProto | ir.Model, feed: dict) -> np.ndarray:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, feed)[0]


# ---------------------------------------------------------------- finding blocks


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_are_found_by_structure_in_every_form(kind):
    model = ir.from_proto(build(kind, layers=3))
    for index, node in enumerate(model.graph):  # names mean nothing
        node.name = f"node{index}"
    blocks = ffn.find_blocks(model)
    assert len(blocks) == 3
    expected = {"gelu": "Erf", "bias_gelu": "BiasGelu", "swiglu": "Sigmoid", "packed": "QuickGelu"}
    for block in blocks:
        assert block.width == INTER
        assert block.activation == expected[kind]
        assert len(block.projections) == (2 if kind == "swiglu" else 1)
        assert block.residual is not None
        assert (block.bias is not None) == (kind in ("gelu", "bias_gelu"))
    if kind == "packed":
        assert all(b.projections[0].split is not None for b in blocks)
        assert all(b.projections[0].parts == 2 for b in blocks)


def _linear_pair() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
    ]
    inits = [
        _init("w1", rng.standard_normal((HIDDEN, INTER))),
        _init("w2", rng.standard_normal((INTER, HIDDEN))),
    ]
    return _model(nodes, inits)


def _read_elsewhere(name: str):
    """A GELU block one of whose channel values (``l0_h``: the down input; ``l0_u``: the up
    output) also feeds a second output: its width is visible, it cannot shrink."""

    def make() -> onnx.ModelProto:
        model = build("gelu", layers=1)
        model.graph.node.append(helper.make_node("ReduceSum", [name], ["side"], keepdims=1))
        model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
        return model

    return make


@pytest.mark.parametrize("make", [_linear_pair, _read_elsewhere("l0_h"), _read_elsewhere("l0_e")])
def test_what_is_not_a_prunable_block(make):
    assert ffn.find_blocks(ir.from_proto(make())) == []


# ---------------------------------------------------------------- pruning is exact on what it keeps


def _zero_rows(model: onnx.ModelProto, names: list[str], removed: list[np.ndarray]) -> None:
    """The reference: the removed channels' rows of each down weight set to zero."""
    by_name = {init.name: init for init in model.graph.initializer}
    for name, rows in zip(names, removed, strict=True):
        array = numpy_helper.to_array(by_name[name]).copy()
        array[rows] = 0
        by_name[name].CopyFrom(numpy_helper.from_array(array, name))


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_model_computes_exactly_the_kept_channels(kind):
    """Removing channels must equal zeroing their down rows: any misaligned column, bias
    entry, Split width or packed part breaks the equality."""
    proto = build(kind)
    model = ir.from_proto(proto)
    blocks = ffn.find_blocks(model)
    rng = np.random.default_rng(5)
    keeps = [np.sort(rng.choice(INTER, size=40, replace=False)) for _ in blocks]
    removed = [np.setdiff1d(np.arange(INTER), keep) for keep in keeps]
    downs = [b.down.inputs[1].name for b in blocks]
    rewrite = Rewrite(model.graph, all_names(model))
    for block, keep in zip(blocks, keeps, strict=True):
        ffn.prune(rewrite, block, keep, block.down_weight()[keep], None)
    rewrite.finish()
    pruned = ir.to_proto(model)
    onnx.checker.check_model(pruned, full_check=True)  # declared shapes were updated
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    reference = build(kind)
    _zero_rows(reference, downs, removed)
    for feed in feeds(2):
        np.testing.assert_allclose(run(pruned, feed), run(reference, feed), rtol=1e-5, atol=1e-5)
    widths = {numpy_helper.to_array(i).shape for i in pruned.graph.initializer}
    assert (40, HIDDEN) in widths and (INTER, HIDDEN) not in widths
    if kind == "packed":
        splits = [n for n in pruned.graph.node if n.op_type == "Split"]
        sizes = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
        assert all(list(sizes[s.input[1]]) == [40, 40] for s in splits)
        assert (HIDDEN, 80) in widths


def test_intercept_without_a_bias_adds_one_and_keeps_the_output_name():
    """A block with no down bias whose output is the graph output itself."""
    proto = build("swiglu", layers=1)
    for node in proto.graph.node:
        if node.op_type == "Add":  # drop the residual: the down MatMul writes "y"
            proto.graph.node.remove(node)
            break
    next(n for n in proto.graph.node if n.output[0] == "l0_o").output[0] = "y"
    model = ir.from_proto(proto)
    (block,) = ffn.find_blocks(model)
    assert block.bias is None and block.residual is None
    keep = np.arange(0, INTER, 2)
    intercept = np.full(HIDDEN, 0.25)
    prune_one(model, block, keep, block.down_weight()[keep], intercept)
    pruned = ir.to_proto(model)
    onnx.checker.check_model(pruned, full_check=True)
    assert [o.name for o in pruned.graph.output] == ["y"]
    assert pruned.graph.node[-1].op_type == "Add"
    feed = feeds(1)[0]
    unbiased = ir.from_proto(proto)
    (plain,) = ffn.find_blocks(unbiased)
    prune_one(unbiased, plain, keep, plain.down_weight()[keep])
    np.testing.assert_allclose(run(pruned, feed), run(unbiased, feed) + 0.25, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- importance and reconstruction


def test_padding_is_not_a_token():
    hidden = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int64)
    rows = moments.tokens(hidden, {"input_ids": mask, "attention_mask": mask})
    np.testing.assert_array_equal(rows, hidden.reshape(6, 4)[[0, 1, 3]])
    assert moments.tokens(hidden, {"x": hidden}).shape == (6, 4)


def test_a_changed_output_shape_fails_the_stage():
    """The last line of defence: the pruned model must answer with the original's outputs."""
    original = ir.from_proto(build("swiglu", layers=1))
    sets = feeds(1)
    reference = [{"y": run(original, sets[0])}]
    truncated = build("swiglu", layers=1)
    truncated.graph.node[-1].output[0] = "y_full"
    truncated.graph.node.append(helper.make_node("Slice", ["y_full", "s0", "s1", "ax"], ["y"]))
    truncated.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([v], np.int64), n)
            for n, v in (("s0", 0), ("s1", 2), ("ax", 1))
        ]
    )
    truncated.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 2
    with pytest.raises(VerificationFailed, match="output 'y'"):
        check_interface(ir.from_proto(truncated), sets, reference)
    check_interface(original, sets, reference)


def _gram(model: ir.Model, data: list[dict]) -> tuple[ffn.FfnBlock, moments.Moments]:
    (block,) = ffn.find_blocks(model)
    (stats,) = moments.collect(model, [block], lambda _s: [data])
    return block, stats


def test_importance_comes_from_activations_not_weight_size():
    """Channels whose activation is always zero (a very negative bias before ReLU) but whose
    down rows are the LARGEST go first; weight magnitude alone would keep them."""
    rng = np.random.default_rng(3)
    dead = np.arange(0, INTER, 4)
    bias = rng.standard_normal(INTER) / 4
    bias[dead] = -100.0
    down = rng.standard_normal((INTER, HIDDEN)) / 8
    down[dead] *= 50
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["u"]),
        helper.make_node("Add", ["u", "b1"], ["a"]),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
    ]
    inits = [
        _init("w1", rng.standard_normal((HIDDEN, INTER)) / 4),
        _init("b1", bias),
        _init("w2", down),
    ]
    model = ir.from_proto(_model(nodes, inits))
    block, stats = _gram(model, feeds(3))
    for centered in (False, True):
        scores = importance.channel_scores(stats.grams[0], block.down_weight(), centered)
        (keep,) = importance.allocate([scores], np.array([np.nan]), len(dead) / INTER)
        assert set(np.setdiff1d(np.arange(INTER), keep)) == set(dead)


def test_allocation_follows_residual_energy_within_its_cap():
    scores = [np.linspace(1, 2, 100), np.linspace(1, 2, 100)]
    # The second block's residual stream is 10x stronger: its channels matter less.
    keeps = importance.allocate(scores, np.array([1.0, 10.0]), 0.2)
    removed = [100 - len(k) for k in keeps]
    assert sum(removed) == 40
    assert removed[1] == int(importance.SPREAD * 0.2 * 100) and removed[0] == 40 - removed[1]
    assert all(k[0] == 100 - len(k) for k in keeps)  # the lowest scores went: a prefix
    uniform = importance.allocate(scores, np.array([1.0, np.nan]), 0.2)
    assert [len(k) for k in uniform] == [80, 80]


def _redundant_model(seed: int = 0) -> onnx.ModelProto:
    """A BiasGelu block whose up weight has pairs of nearly equal columns: a removed channel
    has a twin the refit can lean on."""
    rng = np.random.default_rng(seed)
    half = rng.standard_normal((HIDDEN, INTER // 2)) / 4
    up = np.concatenate([half, half + rng.standard_normal(half.shape) * 0.01], axis=1)
    nodes, inits, info = gelu_block("l0_", "x", "y", rng, fused=True, up=up)
    return _model(nodes, inits, info)


def test_reconstruction_reduces_block_error_on_held_out_data():
    model = ir.from_proto(_redundant_model())
    block, stats = _gram(model, feeds(8, seed=1))
    _, held_out = _gram(model, feeds(8, seed=2))
    weight = block.down_weight()
    scores = importance.channel_scores(stats.grams[0], weight, centered=True)
    (keep,) = importance.allocate([scores], np.array([np.nan]), 0.4)
    new_weight, intercept = reconstruct.refit(stats.grams[0], weight, keep)
    gram = held_out.grams[0]
    plain = reconstruct.relative_error(gram, weight, keep, weight[keep], None)
    refit = reconstruct.relative_error(gram, weight, keep, new_weight, intercept)
    assert refit < 0.5 * plain, (plain, refit)
    # The same holds for the model's real output on those inputs, not only in the formula.
    outputs = {}
    for label, (w, c) in {"plain": (weight[keep], None), "refit": (new_weight, intercept)}.items():
        pruned = ir.from_proto(_redundant_model())
        (target,) = ffn.find_blocks(pruned)
        prune_one(pruned, target, keep, w, c)
        outputs[label] = [run(pruned, f) for f in feeds(8, seed=2)]
    full = [run(_redundant_model(), f) for f in feeds(8, seed=2)]
    error = {
        k: sum(float(np.square(a - b).sum()) for a, b in zip(v, full, strict=True))
        for k, v in outputs.items()
    }
    assert error["refit"] < 0.5 * error["plain"], error


def test_refit_infinite_ridge_is_bias_compensation_only():
    model = ir.from_proto(_redundant_model())
    block, stats = _gram(model, feeds(4))
    weight = block.down_weight()
    keep = np.arange(0, INTER, 2)
    new_weight, intercept = reconstruct.refit(stats.grams[0], weight, keep, np.inf)
    np.testing.assert_array_equal(new_weight, weight[keep])
    gram = stats.grams[0]
    removed = np.setdiff1d(np.arange(INTER), keep)
    np.testing.assert_allclose(intercept, gram[removed, INTER] @ weight[removed] / gram[-1, -1])


# ---------------------------------------------------------------- the guard's search


@pytest.mark.parametrize("threshold", [0, 1, 3, 7, 12, 18])
def test_largest_within_finds_the_last_level_within_budget(threshold):
    class Score:
        def __init__(self, level):
            self.drop = level / 100

        def within(self, budget):
            return self.drop <= budget + 1e-12

    measured = []

    def measure(level):
        measured.append(level)
        return Point(level * 0.05, Score(level))

    chosen, path = largest_within(18, measure, threshold / 100)
    assert (chosen.fraction if chosen else 0) == pytest.approx(threshold * 0.05)
    assert len(measured) == len(set(measured)) <= 9  # doubling + bisection, nothing twice
    assert [p.fraction for p in path] == sorted(p.fraction for p in path)


# ---------------------------------------------------------------- the CLI


def _calibration(folder: Path, count: int = 12, seed: int = 7) -> Path:
    folder.mkdir()
    for index, feed in enumerate(feeds(count, seed=seed)):
        np.savez(folder / f"set{index}.npz", **feed)
    return folder


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def test_spec_parsing():
    assert spec.parse("ffn=0.25") == spec.PruneSpec(ffn=0.25)
    assert spec.parse(" auto ").auto
    for bad, message in [
        ("ffn=1.5", "must be in (0, 1)"),
        ("ffn=0", "must be in (0, 1)"),
        ("bogus=0.1", "unknown pruning target 'bogus'"),
        ("ffn=abc", "expects a fraction"),
        ("ffn", "expected auto or TARGET=VALUE"),
        ("ffn=0.1,ffn=0.2", "given twice"),
        ("", "expected auto"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            spec.parse(bad)


@pytest.mark.parametrize("kind, refit", [("gelu", True), ("packed", False)])
def test_cli_prune_then_quantize(tmp_path, kind, refit):
    """After the fusions (the exported GELU becomes BiasGelu; the packed form stays), prune a
    quarter of the channels, then int8: both stages reported, both final checks passed."""
    src = _save(build(kind, seed=2), tmp_path / "m.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    calibration = _calibration(tmp_path / "calib")
    done = run_cli(
        src, "-o", out, "--report", report, "--no-speed-check",
        "--prune", "ffn=0.25", "--prune-max-drop", "0.2", "--calibration", calibration,
        "--precision", "int8-dynamic", "--max-drop", "0.05",
        "--prune-reconstruct" if refit else "--no-prune-reconstruct",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    section = data["pruning"]
    assert section["reconstruction"] is refit
    assert all(("block_error_refit" in row) is refit for row in section["layers"])
    totals = section["totals"]["ffn"]
    assert section["final_check"]["passed"] and totals["before"] == 2 * INTER
    assert totals["after"] == 2 * INTER - round(0.25 * 2 * INTER)
    assert data["quantization"]["final_check"]["passed"]
    result = onnx.load(str(out))
    ops = {n.op_type for n in result.graph.node}
    assert "MatMulInteger" in ops
    kept = [row["kept"] for row in section["layers"]]
    shapes = {tuple(i.dims) for i in result.graph.initializer}
    assert all((k, HIDDEN) in shapes for k in kept), (kept, shapes)
    assert run(result, feeds(1)[0]).shape == (3, SEQ, HIDDEN)


def test_cli_auto_stops_within_budget(tmp_path):
    src = _save(build("bias_gelu", seed=4), tmp_path / "m.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    calibration = _calibration(tmp_path / "calib", count=16)
    budget = 0.01
    done = run_cli(
        src, "-o", out, "--report", report, "--no-speed-check", "--prune", "auto",
        "--prune-max-drop", str(budget), "--calibration", calibration,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    section = json.loads(report.read_text())["pruning"]
    search = section["search"]
    within = [p["fraction"] for p in search if p["within_budget"]]
    missed = [p["fraction"] for p in search if not p["within_budget"]]
    assert within and missed, search  # the search went past the budget and came back
    assert section["fractions"] == {"ffn": max(within)} and max(within) < min(missed)
    assert round(min(missed) - max(within), 6) == 0.05  # adjacent on the grid
    assert all(p["drop"] <= budget for p in search if p["within_budget"])
    assert section["pruned"] and section["final_check"]["metric"] == "cosine"


def test_cli_fixed_share_over_budget_exits_1(tmp_path):
    src = _save(build("bias_gelu"), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    calibration = _calibration(tmp_path / "calib")
    done = run_cli(
        src, "-o", out, "--no-speed-check", "--prune", "ffn=0.8", "--prune-max-drop", "0.0001",
        "--calibration", calibration,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "prune ffn=0.8: mean cosine" in " ".join(done.stderr.split())
    assert not out.exists()


@pytest.mark.slow
def test_cli_prunes_a_causal_lm_judged_on_text(tmp_path):
    """A tiny SmolLM2 export (SwiGLU MLPs; after the fusions a packed gate/up MatMul + Split
    + QuickGelu), its tokenizer beside it under the zoo's name (``NAME.tokenizer.json``): the
    moments come from windows of text, the final check is perplexity on held-out text.
    Kernel timing is off so every SiLU is fused whatever this CPU's timing says."""
    from models.export import export_model
    from tests.test_lm_guard import byte_tokenizer

    path = tmp_path / "lm.onnx"
    export_model("smollm2", path, tiny=True)
    byte_tokenizer(tmp_path / "lm.tokenizer.json")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    done = run_cli(
        path, "-o", out, "--report", report, "--no-speed-check", "--prune", "ffn=0.25",
        "--prune-max-drop", "5", "--min-top1", "0", "--no-time-kernels", timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    section = json.loads(report.read_text())["pruning"]
    assert section["metric"] == "perplexity"
    assert "windows of 256 tokens of the bundled calibration text" in section["data"]["importance"]
    assert {row["activation"] for row in section["layers"]} == {"QuickGelu"}
    assert section["final_check"]["outputs"]["split"] == "evaluation"
    width = section["totals"]["ffn"]
    assert width["after"] == width["before"] - round(0.25 * width["before"])


def test_bench_refuses_smollm2_without_its_model(capsys):
    from pipeline.bench.prune import main

    with pytest.raises(SystemExit) as stopped:
        main(["--only", "smollm2"])
    assert stopped.value.code == 2
    assert "--smollm2 OPTIMIZED.onnx is needed" in capsys.readouterr().err


# ---------------------------------------------------------------- attention heads

HEADS = 4


def attention_model(layers: int = 2, seed: int = 0, **attributes) -> onnx.ModelProto:
    """``layers`` x (fused com.microsoft Attention of HEADS heads -> MatMul(W_o) -> Add(b_o)
    -> + x), then a BiasGelu block: the form ``fuse_attention`` leaves an encoder in."""
    rng = np.random.default_rng(seed)
    nodes, inits, info, x = [], [], [], "x"
    for layer in range(layers):
        p = f"a{layer}_"
        inits += [
            _init(f"{p}wqkv", rng.standard_normal((HIDDEN, 3 * HIDDEN)) / 4),
            _init(f"{p}bqkv", rng.standard_normal(3 * HIDDEN) / 4),
            _init(f"{p}wo", rng.standard_normal((HIDDEN, HIDDEN)) / 4),
            _init(f"{p}bo", rng.standard_normal(HIDDEN) / 8),
        ]
        nodes += [
            helper.make_node(
                "Attention", [x, f"{p}wqkv", f"{p}bqkv"], [f"{p}att"], domain=MS,
                num_heads=HEADS, **attributes,
            ),
            helper.make_node("MatMul", [f"{p}att", f"{p}wo"], [f"{p}o"]),
            helper.make_node("Add", [f"{p}o", f"{p}bo"], [f"{p}ob"]),
            helper.make_node("Add", [x, f"{p}ob"], [f"{p}r"]),
        ]  # fmt: skip
        info.append(_inter_info(f"{p}att", HIDDEN))
        x = f"{p}r"
    parts = gelu_block("f_", x, "y", rng, fused=True)
    return _model(nodes + parts[0], inits + parts[1], info + parts[2])


def test_attention_heads_are_found_on_the_fused_op_only_in_its_plain_form():
    from pipeline.pruning import heads

    blocks = heads.find_blocks(ir.from_proto(attention_model()))
    assert [(b.heads, b.head_size, b.residual is not None) for b in blocks] == [(4, 4, True)] * 2
    assert heads.find_blocks(ir.from_proto(attention_model(qkv_hidden_sizes=[16, 16, 16]))) == []
    assert heads.find_blocks(ir.from_proto(build("bias_gelu"))) == []


def test_pruned_heads_compute_exactly_the_kept_heads():
    """Removing heads equals zeroing their rows of W_o: a misplaced Q, K or V column, bias
    entry or head count breaks the equality."""
    from pipeline.pruning import heads

    model = ir.from_proto(attention_model())
    blocks = heads.find_blocks(model)
    keeps = [np.array([0, 2, 3]), np.array([1])]
    rewrite = Rewrite(model.graph, all_names(model))
    for block, keep in zip(blocks, keeps, strict=True):
        heads.prune(rewrite, block, keep, block.down_weight()[block.channels(keep)], None)
    rewrite.finish()
    pruned = ir.to_proto(model)
    onnx.checker.check_model(pruned, full_check=True)
    attention = [n for n in pruned.graph.node if n.op_type == "Attention"]
    assert [n.attribute[0].i for n in attention] == [3, 1]
    reference = attention_model()
    removed = [
        np.setdiff1d(np.arange(HIDDEN), b.channels(k)) for b, k in zip(blocks, keeps, strict=True)
    ]
    _zero_rows(reference, ["a0_wo", "a1_wo"], removed)
    for feed in feeds(2):
        np.testing.assert_allclose(run(pruned, feed), run(reference, feed), rtol=1e-5, atol=1e-5)


def test_cli_prunes_heads_and_ffn_together(tmp_path):
    src = _save(attention_model(seed=3), tmp_path / "m.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    calibration = _calibration(tmp_path / "calib")
    done = run_cli(
        src, "-o", out, "--report", report, "--no-speed-check", "--prune",
        "ffn=0.25,heads=0.5", "--prune-max-drop", "0.5", "--calibration", calibration,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    section = json.loads(report.read_text())["pruning"]
    assert section["targets"] == "ffn=0.25,heads=0.5"
    assert section["totals"]["heads"]["before"] == 2 * HEADS
    assert section["totals"]["heads"]["after"] == HEADS
    assert section["totals"]["ffn"]["after"] == INTER - INTER // 4
    result = onnx.load(str(out))
    kept = [a.i for n in result.graph.node if n.op_type == "Attention" for a in n.attribute]
    assert sum(kept) == HEADS
    assert run(result, feeds(1)[0]).shape == (3, SEQ, HIDDEN)


def test_cli_heads_without_fused_attention_says_so(tmp_path):
    src = _save(build("bias_gelu"), tmp_path / "m.onnx")
    done = run_cli(
        src, "-o", tmp_path / "o.onnx", "--prune", "heads=0.25",
        "--calibration", _calibration(tmp_path / "calib"),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--prune heads: no prunable attention found" in " ".join(done.stderr.split())


@pytest.mark.parametrize("op", ["SkipSimplifiedLayerNormalization", "SkipLayerNormalization"])
def test_intercept_goes_to_a_fused_residual_norms_bias(op):
    """A block without bias read by ORT's fused residual norm (SmolLM2 after fuse_rms_norm):
    the refit's intercept becomes that node's bias input, no Add is added, and the result
    equals an explicit Add before it."""
    proto = build("swiglu", layers=1)
    residual = next(n for n in proto.graph.node if n.op_type == "Add")
    proto.graph.node.remove(residual)
    inputs = ["x", "l0_o", "gamma"] + (["beta"] if op == "SkipLayerNormalization" else [])
    proto.graph.node.append(helper.make_node(op, inputs, ["y"], domain=MS, epsilon=1e-5))
    proto.graph.initializer.extend(
        [_init("gamma", np.ones(HIDDEN)), _init("beta", np.zeros(HIDDEN))]
    )
    keep, intercept = np.arange(0, INTER, 2), np.linspace(-1, 1, HIDDEN)
    model = ir.from_proto(proto)
    (block,) = ffn.find_blocks(model)
    assert block.residual is not None and block.residual.name == "x"
    prune_one(model, block, keep, block.down_weight()[keep], intercept)
    pruned = ir.to_proto(model)
    assert [n.op_type for n in pruned.graph.node].count("Add") == 0
    norm = next(n for n in pruned.graph.node if n.op_type == op)
    assert len(norm.input) == (4 if op.startswith("SkipSimplified") else 5)
    explicit = ir.from_proto(proto)
    (plain,) = ffn.find_blocks(explicit)
    prune_one(explicit, plain, keep, plain.down_weight()[keep])
    reference = ir.to_proto(explicit)
    reference.graph.initializer.append(_init("c", intercept))
    node = next(n for n in reference.graph.node if n.op_type == op)
    node.input[1] = "l0_oc"
    reference.graph.node.insert(
        list(reference.graph.node).index(node), helper.make_node("Add", ["l0_o", "c"], ["l0_oc"])
    )
    feed = feeds(1)[0]
    np.testing.assert_allclose(run(pruned, feed), run(reference, feed), rtol=1e-4, atol=1e-4)


def test_stage_prunes_a_model_whose_weights_live_in_another_models_data_file(tmp_path):
    """A large model's weights stay on disk (the optimized SmolLM2 as the bench loads it):
    the stage's own copies must carry them, or ONNX Runtime looks for the data file beside
    the temporary copy (it failed with 'External data path does not exist')."""
    from pipeline.pruning import stage as prune_stage
    from pipeline.quantization.stage import QuantizeOptions
    from pipeline.runtime import sessions

    source = tmp_path / "weights" / "m.onnx"
    source.parent.mkdir()
    onnx.save(build("gelu", seed=2), source, save_as_external_data=True, size_threshold=0)
    model = ir.load(source)
    assert sessions.has_external_tensors(model)
    sets = feeds(2)
    reference = sessions.run_all(sessions.create_session(model), sets)
    accuracy = QuantizeOptions(calibration=_calibration(tmp_path / "calib"))
    options = prune_stage.PruneOptions(spec.parse("ffn=0.25"), max_drop=0.5, latency_rounds=3)
    pruned, section = prune_stage.run_stage(model, options, accuracy, sets, reference)
    assert section["final_check"]["passed"], section["final_check"]
    assert section["totals"]["ffn"]["after"] == 2 * INTER - round(0.25 * 2 * INTER)
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    sessions.save_self_contained(pruned, out)
    assert run(onnx.load(str(out)), sets[0]).shape == (3, SEQ, HIDDEN)
