"""Whole-layer pruning (``--prune layers=N``) on tiny models built here: a post-LN encoder
(fused ``SkipLayerNormalization`` and the unfused ``Add`` + ``LayerNormalization``), a
pre-norm decoder with a KV cache (``SkipSimplifiedLayerNormalization`` handing its residual
sum on, ``present.N`` outputs), and the tiny SmolLM2 export end to end.

Weights are random from a fixed seed, except where a test needs to predict the outcome: one
layer's contributions made tiny (the least influential layer, which must be the one cut),
or constant (a cut that replaces them by their mean must change nothing).
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

from pipeline.pruning import layers, moments, spec
from pipeline.pruning.stage import least_influential
from tests.test_cli import run_cli

HIDDEN, SEQ, PAST, MS = 16, 6, 3, "com.microsoft"


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _weights(rng, p: str, scale: float, constant: bool) -> dict[str, np.ndarray]:
    """One layer's projections; the two that write to the residual stream (``wo``, ``w2``)
    and their biases times ``scale``, or zero with a constant bias (``constant``)."""
    w = {name: rng.standard_normal((HIDDEN, HIDDEN)) / 4 for name in ("wq", "wk", "wv", "w1")}
    w["wo"] = rng.standard_normal((HIDDEN, HIDDEN)) / 4 * scale
    w["w2"] = rng.standard_normal((HIDDEN, HIDDEN)) / 4 * scale
    w |= {name: rng.standard_normal(HIDDEN) / 4 * scale for name in ("bo", "b2")}
    w["b1"] = rng.standard_normal(HIDDEN) / 4
    if constant:
        w["wo"], w["w2"] = np.zeros((HIDDEN, HIDDEN)), np.zeros((HIDDEN, HIDDEN))
    return {f"{p}{name}": value for name, value in w.items()}


def encoder(
    count: int = 3, fused: bool = True, quiet: int | None = None, constant: int | None = None
) -> onnx.ModelProto:
    """``count`` post-LN layers: single-head attention -> W_o + b_o -> residual norm, then
    MatMul -> Add -> Relu -> MatMul -> Add -> residual norm. The residual norm is
    ``SkipLayerNormalization`` (``fused``) or ``Add`` + ``LayerNormalization``. Layer
    ``quiet`` writes a thousandth of what the others write; layer ``constant`` writes its
    biases only."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [_init("scale", 0.25)], "x"
    for layer in range(count):
        p = f"l{layer}_"
        weights = _weights(rng, p, 1e-3 if layer == quiet else 1.0, layer == constant)
        inits += [_init(name, value) for name, value in weights.items()]
        inits += [_init(f"{p}g{i}", np.ones(HIDDEN)) for i in (1, 2)]
        inits += [_init(f"{p}be{i}", np.zeros(HIDDEN)) for i in (1, 2)]
        nodes += [
            helper.make_node("MatMul", [x, f"{p}wq"], [f"{p}q"]),
            helper.make_node("MatMul", [x, f"{p}wk"], [f"{p}k"]),
            helper.make_node("MatMul", [x, f"{p}wv"], [f"{p}v"]),
            helper.make_node("Transpose", [f"{p}k"], [f"{p}kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [f"{p}q", f"{p}kt"], [f"{p}s"]),
            helper.make_node("Mul", [f"{p}s", "scale"], [f"{p}ss"]),
            helper.make_node("Softmax", [f"{p}ss"], [f"{p}pr"], axis=-1),
            helper.make_node("MatMul", [f"{p}pr", f"{p}v"], [f"{p}ctx"]),
            helper.make_node("MatMul", [f"{p}ctx", f"{p}wo"], [f"{p}o"]),
            helper.make_node("Add", [f"{p}o", f"{p}bo"], [f"{p}ob"]),
            *_post_norm(fused, x, f"{p}ob", p, 1, f"{p}r1"),
            helper.make_node("MatMul", [f"{p}r1", f"{p}w1"], [f"{p}u"]),
            helper.make_node("Add", [f"{p}u", f"{p}b1"], [f"{p}a"]),
            helper.make_node("Relu", [f"{p}a"], [f"{p}h"]),
            helper.make_node("MatMul", [f"{p}h", f"{p}w2"], [f"{p}d"]),
            helper.make_node("Add", [f"{p}d", f"{p}b2"], [f"{p}db"]),
            *_post_norm(fused, f"{p}r1", f"{p}db", p, 2, "y" if layer == count - 1 else f"{p}r2"),
        ]
        x = f"{p}r2"
    tensor = ["batch", SEQ, HIDDEN]
    return _model(nodes, inits, [("x", tensor)], [("y", tensor)])


def _post_norm(fused: bool, stream: str, block: str, p: str, i: int, out: str) -> list:
    if fused:
        inputs = [stream, block, f"{p}g{i}", f"{p}be{i}"]
        return [helper.make_node("SkipLayerNormalization", inputs, [out], domain=MS, epsilon=1e-5)]
    return [
        helper.make_node("Add", [stream, block], [f"{p}sum{i}"]),
        helper.make_node(
            "LayerNormalization", [f"{p}sum{i}", f"{p}g{i}", f"{p}be{i}"], [out], epsilon=1e-5
        ),
    ]


def decoder(count: int = 3, constant: int | None = None) -> onnx.ModelProto:
    """``count`` pre-norm layers with a KV cache, as SmolLM2 looks after the passes:
    ``present.N = Concat(past.N, h W_k)``, a crude attention (``h W_q`` times the cache's
    mean over time) -> W_o, ``SkipSimplifiedLayerNormalization`` whose fourth output (the
    residual sum) is the stream handed on, a SwiGLU MLP, and the next such norm."""
    rng = np.random.default_rng(1)
    nodes, inits, stream, normed = [], [], "x", "x"
    for layer in range(count):
        p = f"l{layer}_"
        weights = _weights(rng, p, 1.0, layer == constant)
        inits += [_init(name, value) for name, value in weights.items()]
        inits += [_init(f"{p}g{i}", 1 + rng.standard_normal(HIDDEN) / 8) for i in (1, 2)]
        last = layer == count - 1
        nodes += [
            helper.make_node("MatMul", [normed, f"{p}wk"], [f"{p}k"]),
            helper.make_node("Concat", [f"past.{layer}", f"{p}k"], [f"present.{layer}"], axis=1),
            helper.make_node("ReduceMean", [f"present.{layer}"], [f"{p}c"], axes=[1]),
            helper.make_node("MatMul", [normed, f"{p}wq"], [f"{p}q"]),
            helper.make_node("Mul", [f"{p}q", f"{p}c"], [f"{p}ctx"]),
            helper.make_node("MatMul", [f"{p}ctx", f"{p}wo"], [f"{p}o0"]),
            helper.make_node("Add", [f"{p}o0", f"{p}bo"], [f"{p}o"]),
            _skip_simplified([stream, f"{p}o", f"{p}g1"], [f"{p}n1", "", "", f"{p}r1"]),
            helper.make_node("MatMul", [f"{p}n1", f"{p}wv"], [f"{p}gate"]),
            helper.make_node("Sigmoid", [f"{p}gate"], [f"{p}sg"]),
            helper.make_node("Mul", [f"{p}gate", f"{p}sg"], [f"{p}silu"]),
            helper.make_node("MatMul", [f"{p}n1", f"{p}w1"], [f"{p}up"]),
            helper.make_node("Mul", [f"{p}silu", f"{p}up"], [f"{p}h"]),
            helper.make_node("MatMul", [f"{p}h", f"{p}w2"], [f"{p}d"]),
            _skip_simplified(
                [f"{p}r1", f"{p}d", f"{p}g2", f"{p}b2"],
                ["y"] if last else [f"{p}n2", "", "", f"{p}r2"],
            ),
        ]
        stream, normed = f"{p}r2", f"{p}n2"
    cache = [
        (f"{kind}.{layer}", ["batch", "past" if kind == "past" else "total", HIDDEN])
        for kind in ("past", "present")
        for layer in range(count)
    ]
    inputs = [("x", ["batch", "seq", HIDDEN])] + cache[:count]
    return _model(nodes, inits, inputs, [("y", ["batch", "seq", HIDDEN])] + cache[count:])


def _skip_simplified(inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    return helper.make_node(
        "SkipSimplifiedLayerNormalization", inputs, outputs, domain=MS, epsilon=1e-5
    )


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    def info(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(
        nodes,
        "layers",
        [info(*i) for i in inputs],
        [info(*o) for o in outputs],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def encoder_feeds(count: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, SEQ, HIDDEN)).astype(np.float32)} for _ in range(count)]


def decoder_feeds(count: int = 2, layers_: int = 3, seed: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.standard_normal((2, SEQ, HIDDEN)).astype(np.float32),
            **{
                f"past.{layer}": rng.standard_normal((2, PAST, HIDDEN)).astype(np.float32)
                for layer in range(layers_)
            },
        }
        for _ in range(count)
    ]


def session(model: onnx.ModelProto | ir.Model) -> ort.InferenceSession:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, ["CPUExecutionProvider"])


def cut(proto: onnx.ModelProto, chosen: list[int], data: list[dict]) -> ir.Model:
    """``layers.remove`` with the contributions' means measured on ``data``."""
    model = ir.from_proto(proto)
    found = layers.find_layers(model)
    values = [s.contribution for layer in found for s in layer.sublayers]
    (means,) = moments.means(model, values, lambda _s: [data])
    return layers.remove(model, chosen, means.values)


FORMS = {
    "encoder fused": (lambda **kw: encoder(fused=True, **kw), encoder_feeds),
    "encoder unfused": (lambda **kw: encoder(fused=False, **kw), encoder_feeds),
    "decoder kv cache": (decoder, decoder_feeds),
}


# ---------------------------------------------------------------- layers found, layers cut


@pytest.mark.parametrize("form", FORMS)
def test_layers_are_found_by_structure(form):
    build, _ = FORMS[form]
    model = ir.from_proto(build())
    for index, node in enumerate(model.graph):  # names mean nothing
        node.name = f"node{index}"
    found = layers.find_layers(model)
    assert [[s.feed_forward for s in layer.sublayers] for layer in found] == [[False, True]] * 3


# encoder: 10 attention nodes + 5 FFN nodes; with fused norms, + 2 x (Shape, Expand);
# decoder: 11 (its K projection and Concat compute present.1), + 2 x (Shape, Expand)
NODES_CUT = {"encoder fused": 11, "encoder unfused": 15, "decoder kv cache": 7}


def _op_count(model: onnx.ModelProto, op: str | None = None) -> int:
    return sum(1 for n in model.graph.node if op is None or n.op_type == op)


@pytest.mark.parametrize("form", FORMS)
def test_a_cut_layer_keeps_the_interface_and_loses_its_nodes(form):
    """Every output keeps its name, type and declared shape and ORT gives it the same shape;
    the layer's MatMuls are gone except the decoder's K projection, which computes its
    ``present`` output; the model passes the checker's strict shape inference."""
    build, make_feeds = FORMS[form]
    proto, data = build(), make_feeds()
    pruned = ir.to_proto(cut(proto, [1], data))
    onnx.checker.check_model(pruned, full_check=True)
    assert list(pruned.graph.input) == list(proto.graph.input)
    assert list(pruned.graph.output) == list(proto.graph.output)
    before, after = session(proto), session(pruned)
    for feed in data:
        expected, got = before.run(None, feed), after.run(None, feed)
        assert [a.shape for a in got] == [e.shape for e in expected]
        assert [a.dtype for a in got] == [e.dtype for e in expected]
    per_layer = _op_count(proto, "MatMul") // 3
    kept = 1 if form.startswith("decoder") else 0  # the K projection feeds present.1
    assert _op_count(pruned, "MatMul") == _op_count(proto, "MatMul") - per_layer + kept
    # nodes of the layer gone, less the Shape + Expand feeding each fused norm's skip
    assert _op_count(pruned) == _op_count(proto) - NODES_CUT[form]
    if form.startswith("decoder"):  # the cache of the cut layer is still the cache
        for feed in data:
            names = [o.name for o in proto.graph.output]
            got = dict(zip(names, after.run(None, feed), strict=True))
            ref = dict(zip(names, before.run(None, feed), strict=True))
            np.testing.assert_allclose(got["present.1"], ref["present.1"], rtol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_a_layer_writing_constants_is_cut_without_changing_the_output(form):
    """Layer 1 adds only its biases to the stream: its means are those constants, so the
    cut (mean in place of the contribution, a fused norm's skip included) is exact."""
    build, make_feeds = FORMS[form]
    proto, data = build(constant=1), make_feeds()
    pruned = cut(proto, [1], data)
    before, after = session(proto), session(pruned)
    for feed in data:
        for e, g in zip(before.run(None, feed), after.run(None, feed), strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_least_influential_ranks_cuts_within_budget_first():
    """An LM cut that lowers perplexity (negative drop) but misses the top-1 floor ranks
    after every cut within the budget."""

    class Score:
        def __init__(self, drop, within=True):
            self.drop, self.ok = drop, within

        def within(self, budget):
            return self.ok and self.drop <= budget

    scores = [Score(0.02), Score(-0.5, within=False), Score(0.01), Score(0.3)]
    assert least_influential(scores, 1, 0.1) == {2}
    assert least_influential(scores, 2, 0.1) == {0, 2}
    assert least_influential(scores, 3, 0.1) == {0, 1, 2}


# ---------------------------------------------------------------- the spec


def test_spec_parsing_of_layers():
    assert spec.parse("layers=2") == spec.PruneSpec(layers=2)
    both = spec.parse("ffn=0.2,layers=2")
    assert both.targets == {"layers": 2, "ffn": 0.2} and both.shares == {"ffn": 0.2}
    assert both.text == "layers=2,ffn=0.2"
    for bad, message in [
        ("layers=0", "layers must be at least 1, got 0"),
        ("layers=1.5", "layers expects a whole number of layers, got '1.5'"),
        ("layers=two", "layers expects a whole number of layers, got 'two'"),
        ("layers=1,layers=2", "layers given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            spec.parse(bad)


# ---------------------------------------------------------------- the CLI


def _calibration(folder: Path, count: int = 12) -> Path:
    folder.mkdir()
    for index, feed in enumerate(encoder_feeds(count, seed=7)):
        np.savez(folder / f"set{index}.npz", **feed)
    return folder


def _prune(tmp_path: Path, model: onnx.ModelProto, prune: str, *more: str):
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    done = run_cli(
        src, "-o", out, "--report", report, "--no-speed-check", "--prune", prune,
        "--calibration", _calibration(tmp_path / "calib"), *more,
    )  # fmt: skip
    section = json.loads(report.read_text())["pruning"] if report.exists() else None
    return done, out, section


@pytest.mark.parametrize("quiet", [1, 2])
def test_cli_cuts_the_least_influential_layer(tmp_path, quiet):
    """The unfused encoder through the passes; layer ``quiet`` barely writes to the stream:
    measured influence must find it, whichever position it has."""
    done, out, section = _prune(
        tmp_path, encoder(fused=False, quiet=quiet), "layers=1", "--prune-max-drop", "0.05"
    )
    assert done.returncode == 0, done.stderr
    rows = [row for row in section["layers"] if row["target"] == "layers"]
    assert [row["removed"] for row in rows] == [int(i == quiet) for i in range(3)]
    influence = [row["influence"] for row in rows]
    assert min(influence) == influence[quiet] < 0.01 < min(np.delete(influence, quiet))
    assert section["layers_removed"] == [f"layer {quiet}"]
    assert section["totals"]["layers"] == pytest.approx(
        {"before": 3, "after": 2, "removed_fraction": 1 / 3}
    )
    assert section["final_check"]["passed"] and "influence" in section["data"]
    result = onnx.load(str(out))
    # two layers of 6 MatMuls left: the passes pack q/k/v into one MatMul + Split
    assert _op_count(result, "MatMul") == 2 * 6 and _op_count(result, "Split") == 2
    assert session(result).run(None, encoder_feeds(1)[0])[0].shape == (2, SEQ, HIDDEN)


def test_cli_layers_then_ffn_share_of_what_remains(tmp_path):
    done, _, section = _prune(
        tmp_path, encoder(fused=False, quiet=0), "layers=1,ffn=0.25", "--prune-max-drop", "0.5"
    )
    assert done.returncode == 0, done.stderr
    assert section["targets"] == "layers=1,ffn=0.25"
    assert section["layers_removed"] == ["layer 0"]
    assert section["totals"]["ffn"]["before"] == 2 * HIDDEN  # the cut layer's FFN is gone
    assert section["totals"]["ffn"]["after"] == 2 * HIDDEN - round(0.25 * 2 * HIDDEN)


def test_cli_refuses_as_many_layers_as_the_model_has(tmp_path):
    done, out, _ = _prune(tmp_path, encoder(), "layers=3")
    assert done.returncode == 2, done.stderr
    message = "--prune layers=3: the model has 3 layer(s); at most 2 can be removed"
    assert message in " ".join(done.stderr.split())
    assert not out.exists()


@pytest.mark.slow
def test_cli_cuts_a_layer_of_a_kv_cache_decoder(tmp_path):
    """The tiny SmolLM2 export (2 layers, pre-RMSNorm fused into
    SkipSimplifiedLayerNormalization, ``present.N.key/value`` outputs), judged on
    perplexity of text: one layer cut, every output still there with its shape."""
    from models.export import export_model
    from tests.test_lm_guard import byte_tokenizer

    path = tmp_path / "lm.onnx"
    export_model("smollm2", path, tiny=True)
    byte_tokenizer(tmp_path / "lm.tokenizer.json")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    done = run_cli(
        path, "-o", out, "--report", report, "--no-speed-check", "--prune", "layers=1",
        "--prune-max-drop", "5", "--min-top1", "0", "--no-time-kernels", timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    section = json.loads(report.read_text())["pruning"]
    assert section["metric"] == "perplexity" and section["totals"]["layers"]["after"] == 1
    rows = [row for row in section["layers"] if row["target"] == "layers"]
    assert len(rows) == 2 and sum(row["removed"] for row in rows) == 1
    original, pruned = onnx.load(str(path)), onnx.load(str(out))
    assert list(pruned.graph.input) == list(original.graph.input)
    assert list(pruned.graph.output) == list(original.graph.output)
    feeds = {
        "input_ids": np.array([[1, 2, 3, 4]], np.int64),
        "attention_mask": np.ones((1, 7), np.int64),
        "position_ids": np.arange(3, 7)[None],
    }
    for value in original.graph.input:
        if value.name.startswith("past_key_values"):
            feeds[value.name] = np.zeros((1, 2, 3, 16), np.float32)
    expected = session(original).run(None, feeds)
    got = session(pruned).run(None, feeds)
    assert [g.shape for g in got] == [e.shape for e in expected]
