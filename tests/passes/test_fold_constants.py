"""fold_constants: constant subgraphs become initializers in one ORT session; random, QDQ,
custom-domain and control-flow ops never fold, and no fold may grow the model."""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from graph_passes import constant_eval
from graph_passes.cleanup.fold_constants import SMALL_BYTES, FoldConstants
from graph_passes.shapes import infer_shapes
from graph_passes.testing.helpers import apply_pass, assert_parity, check, op_list
from pipeline.runtime import sessions as runners

HEADER = '<ir_version: 10, opset_import: ["" : 21]>\n'
RNG = np.random.default_rng(0)


def build(text: str, header: str = HEADER, **weights: np.ndarray) -> ir.Model:
    """ONNX text for the structure, numpy arrays for the initializers it names."""
    proto = onnx.parser.parse_model(header + text)
    for name, array in weights.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return ir.from_proto(proto)


def fold(model: ir.Model, feeds=None) -> tuple[ir.Model, FoldConstants]:
    """Apply the pass to a copy, check it, and check parity when ``feeds`` is not False."""
    pass_ = FoldConstants()
    candidate, result = apply_pass(pass_, model)
    assert result.modified == (pass_.matches > 0)
    check(candidate)
    if feeds is not False:
        assert_parity(model, candidate, feeds)
    again = FoldConstants()
    assert not again(candidate.clone()).modified, "a second application must find nothing"
    return candidate, pass_


def folded_values(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        name: v.const_value.numpy()
        for name, v in model.graph.initializers.items()
        if name.endswith("_folded")
    }


def size(model: ir.Model) -> int:
    """Serialized bytes once unused initializers are gone (what remove_dead leaves)."""
    model = model.clone()
    for graph in model.graphs():
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(name)
    return ir.to_proto(model).ByteSize()


# -- folds ---------------------------------------------------------------------------------


def test_transpose_of_weight_folds_even_above_small_bytes():
    w = RNG.standard_normal((16, 32)).astype(np.float32)  # 2 KB: same bytes after folding
    model = build(
        "g (float[2,16] x) => (float[2,32] y) { wt = Transpose(w)\ny = MatMul(x, wt) }",
        w=w.T.copy(),
    )
    candidate, pass_ = fold(model)
    assert op_list(candidate) == ["MatMul"]
    assert pass_.matches == 1
    np.testing.assert_array_equal(folded_values(candidate)["wt_folded"], w)


def test_whole_constant_subgraph_runs_in_one_session(monkeypatch):
    sessions = []
    original = runners.create_session

    def counting(model, **kwargs):
        sessions.append(len(model.graph))
        return original(model, **kwargs)

    monkeypatch.setattr(runners, "create_session", counting)
    model = build(
        """g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
        k = Constant<value = float[1] {2.0}>()
        a = Mul(w, k)
        b = Add(a, w)
        c = Sqrt(b)
        y = Add(x, a)
        z = Mul(x, c)
    }""",
        w=np.abs(RNG.standard_normal((2, 3))).astype(np.float32),
    )
    pass_ = FoldConstants()
    candidate, _ = apply_pass(pass_, model)
    assert sessions == [3], "Mul, Add, Sqrt evaluated together, once"
    assert op_list(candidate) == ["Constant", "Add", "Mul"]  # Constant is remove_dead's
    assert pass_.matches == 2  # a (read by y) and c (read by z)
    check(candidate)
    assert_parity(model, candidate)


def test_shape_arithmetic_with_constant_nodes_folds_into_reshape_target():
    model = build("""g (float[2,12] x) => (float[2,3,4] y) {
        s = Constant<value = int64[2] {2, 12}>()
        i = Constant<value = int64[1] {1}>()
        d = Gather<axis = 0>(s, i)
        four = Constant<value = int64[1] {4}>()
        q = Div(d, four)
        two = Constant<value = int64[1] {2}>()
        shape = Concat<axis = 0>(two, q, four)
        y = Reshape(x, shape)
    }""")
    candidate, pass_ = fold(model)
    assert [n for n in op_list(candidate) if n != "Constant"] == ["Reshape"]
    assert pass_.matches == 1
    assert folded_values(candidate)["shape_folded"].tolist() == [2, 3, 4]


def test_empty_optional_inputs_do_not_block_folding():
    model = build(
        """g (float[2,3] x) => (float[2,3] y) {
        c = Clip(w, , hi)
        y = Add(x, c) }""",
        w=np.arange(6, dtype=np.float32).reshape(2, 3),
        hi=np.array(2.5, np.float32),
    )
    candidate, pass_ = fold(model)
    assert op_list(candidate) == ["Add"]
    assert folded_values(candidate)["c_folded"].tolist() == [[0, 1, 2], [2.5, 2.5, 2.5]]


def test_external_data_weights_fold(tmp_path):
    w = RNG.standard_normal((16, 32)).astype(np.float32)
    model = build(
        "g (float[2,16] x) => (float[2,32] y) { wt = Transpose(w)\ny = MatMul(x, wt) }",
        w=w.T.copy(),
    )
    ir.save(model, tmp_path / "m.onnx", external_data="m.data", size_threshold_bytes=0)
    model = ir.load(tmp_path / "m.onnx")
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    assert FoldConstants()(model).modified
    assert op_list(model) == ["MatMul"]
    np.testing.assert_array_equal(folded_values(model)["wt_folded"], w)


def test_graph_output_keeps_name_dtype_and_declared_shape():
    model = build(
        """g (float[2,3] x) => (float[2,3] y, float[N,2] c) {
        y = Relu(x)
        c = Neg(w)
    }""",
        w=np.arange(6, dtype=np.float32).reshape(3, 2),
    )
    candidate, pass_ = fold(model)
    assert op_list(candidate) == ["Relu"]
    out = candidate.graph.outputs[1]
    assert out.name == "c" and out.is_initializer()
    assert out.dtype == ir.DataType.FLOAT
    assert [str(d) for d in out.shape] == ["N", "2"]
    np.testing.assert_array_equal(out.const_value.numpy(), -np.arange(6).reshape(3, 2))


def test_float16_keeps_its_dtype():
    w = RNG.standard_normal((3, 2)).astype(np.float16)
    model = build(
        "g (float16[2,3] x) => (float16[2,3] y) { wt = Transpose(w)\n"
        "h = Mul(wt, wt)\ny = Add(x, h) }",
        w=w,
    )
    # ORT runs fp16 Mul/Add on CPU in float32 and keeps h in float32 between them; the
    # folded h is rounded to fp16 as ONNX says, hence a tolerance of a few fp16 ulps.
    candidate, _ = fold(model, feeds=False)
    assert_parity(model, candidate, rtol=2e-3, atol=2e-3)
    assert op_list(candidate) == ["Add"]
    tensor = candidate.graph.initializers["h_folded"].const_value
    assert tensor.dtype == ir.DataType.FLOAT16
    np.testing.assert_array_equal(tensor.numpy(), w.T * w.T)


@pytest.mark.parametrize("as_constant_node", [False, True])
def test_bfloat16_folds_what_ort_can_compute_and_skips_the_rest(as_constant_node):
    # ORT has a bf16 Transpose but no bf16 Sub on CPU: the one session fails, the
    # node-by-node fallback folds the Transpose (as bf16) and leaves the Sub alone.
    w = np.array([[1.5, -2.0, 3.25], [4.0, 0.5, -6.0]], dtype=ml_dtypes.bfloat16)
    model = build(
        """g (float[3,2] x) => (float[3,2] y) {
        wt = Transpose(w)
        s = Sub(wt, wt)
        f = Cast<to = 1>(s)
        y = Add(x, f)
    }""",
        **({} if as_constant_node else {"w": w}),
    )
    if as_constant_node:
        constant = ir.node("Constant", [], {"value": ir.tensor(w)}, num_outputs=1)
        model.graph.insert_before(model.graph.node(0), constant)
        model.graph.node(1).replace_input_with(0, constant.outputs[0])
        constant.outputs[0].name = "w"
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        runners.create_session(model)  # the premise
    before = ir.to_proto(model).SerializeToString()
    candidate, pass_ = fold(model, feeds=False)
    assert op_list(candidate) == ["Constant"] * as_constant_node + ["Sub", "Cast", "Add"]
    tensor = candidate.graph.initializers["wt_folded"].const_value
    assert tensor.dtype == ir.DataType.BFLOAT16
    np.testing.assert_array_equal(tensor.numpy(), w.T)
    assert ir.to_proto(model).SerializeToString() == before, "the input model is untouched"


def test_falls_back_to_node_by_node_when_the_session_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated ORT failure")

    monkeypatch.setattr(constant_eval, "evaluate", broken)
    model = build(
        "g (float[2,3] x) => (float[2,3] y) { a = Neg(w)\nb = Abs(a)\ny = Add(x, b) }",
        w=RNG.standard_normal((2, 3)).astype(np.float32),
    )
    candidate, pass_ = fold(model)
    assert op_list(candidate) == ["Add"]
    assert pass_.matches == 1


def test_folds_inside_if_branch_into_a_subgraph_initializer():
    model = build(
        """g (bool cond, float[2] x) => (float[2] y) {
        nw = Neg(w)
        y = If(cond) <
            then_branch = t () => (float[2] ty) {
                k = Constant<value = float[2] {1.0, 2.0}>()
                s = Add(k, nw)
                ty = Mul(x, s)
            },
            else_branch = e () => (float[2] ey) {
                ey = Add(w, w)
            }
        >
    }""",
        w=np.array([3.0, 4.0], dtype=np.float32),
    )
    feeds = [{"cond": np.array(c), "x": np.array([1.0, -2.0], np.float32)} for c in (True, False)]
    candidate, pass_ = fold(model, feeds)
    # nw is read by the subgraph: it folds into a main-graph initializer first, then the
    # branch folds Add(k, nw_folded) into an initializer of its own.
    assert op_list(candidate) == ["If"]
    assert list(candidate.graph.initializers) == ["w", "nw_folded"]
    then_graph = candidate.graph.node(0).attributes["then_branch"].as_graph()
    else_graph = candidate.graph.node(0).attributes["else_branch"].as_graph()
    assert [n.op_type for n in then_graph] == ["Constant", "Mul"]
    assert list(then_graph.initializers) == ["s_folded"]
    assert then_graph.initializers["s_folded"].const_value.numpy().tolist() == [-2.0, -2.0]
    assert len(else_graph) == 0 and else_graph.outputs[0].name == "ey"
    assert else_graph.outputs[0].is_initializer()
    assert pass_.matches == 3
    runners.create_session(candidate)  # ORT loads subgraph initializers


def test_loop_state_is_not_constant():
    model = build(
        """g (int64 n, float[2] x) => (float[2] y) {
        cond = Constant<value = bool {1}>()
        y = Loop(n, cond, x) <body = b (int64 i, bool c, float[2] acc) => (bool co, float[2] out) {
            co = Identity(c)
            s = Mul(w, w)
            t = Add(acc, s)
            out = Abs(t)
        }>
    }""",
        w=np.array([0.5, 2.0], dtype=np.float32),
    )
    feeds = [{"n": np.array(3), "x": np.array([1.0, -2.0], np.float32)}]
    candidate, pass_ = fold(model, feeds)
    body = candidate.graph.node(1).attributes["body"].as_graph()
    assert [n.op_type for n in body] == ["Identity", "Add", "Abs"]
    assert pass_.matches == 1


def test_folding_is_deterministic():
    model = build(
        "g (float[2,3] x) => (float[2,3] y) { a = Neg(w)\nb = Neg(w)\nc = Add(a, b)\n"
        "y = Add(x, c) }",
        w=RNG.standard_normal((2, 3)).astype(np.float32),
    )
    first, _ = fold(model)
    second, _ = fold(model)
    assert ir.to_proto(first).SerializeToString() == ir.to_proto(second).SerializeToString()
    assert "c_folded" in first.graph.initializers


def test_fresh_names_do_not_collide():
    model = build(
        "g (float[2] x) => (float[2] y) { a = Neg(w)\na_folded = Relu(x)\ny = Add(a_folded, a) }",
        w=np.array([1.0, 2.0], dtype=np.float32),
    )
    candidate, _ = fold(model)
    assert "a_folded_1" in candidate.graph.initializers


# -- must not fire -------------------------------------------------------------------------

MS_HEADER = '<ir_version: 10, opset_import: ["" : 21, "com.microsoft" : 1]>\n'
CUSTOM_HEADER = '<ir_version: 10, opset_import: ["" : 21, "custom.domain" : 1]>\n'
ML_HEADER = '<ir_version: 10, opset_import: ["" : 21, "ai.onnx.ml" : 3]>\n'
WEIGHTS = {
    "w": np.ones((2, 3), np.float32),
    "q": np.arange(6, dtype=np.int8).reshape(2, 3),
    "scale": np.array(0.1, np.float32),
    "zp": np.array(0, np.int8),
}
QDQ = ("q", "scale", "zp")


class Case(NamedTuple):
    text: str
    weights: tuple[str, ...] = ()  # initializers it reads, from WEIGHTS
    runs: bool = True  # whether ORT can run it (random ops differ, custom ops are unknown)
    header: str = HEADER


NOT_FOLDED = {
    "random_normal_like": Case(
        """g (float[2,3] x) => (float[2,3] y) {
        r = RandomNormalLike<seed = 1.0>(w)
        y = Add(x, r) }""",
        ("w",),
        runs=False,
    ),
    "random_uniform": Case(
        """g (float[2,3] x) => (float[2,3] y) {
        r = RandomUniform<shape = [2, 3], seed = 1.0>()
        y = Add(x, r) }""",
        runs=False,
    ),
    "bernoulli": Case(
        """g (float[2,3] x) => (float[2,3] y) {
        h = Constant<value = float[2,3] {0.5, 0.5, 0.5, 0.5, 0.5, 0.5}>()
        r = Bernoulli(h)
        y = Add(x, r) }""",
        runs=False,
    ),
    "dequantize_int8_weight": Case(
        """g (float[2,3] x) => (float[2,3] y) {
        d = DequantizeLinear(q, scale, zp)
        y = Add(x, d) }""",
        QDQ,
    ),
    "downstream_of_dequantize": Case(
        """g (float[3,2] x) => (float[3,2] y) {
        d = DequantizeLinear(q, scale, zp)
        t = Transpose(d)
        y = Add(x, t) }""",
        QDQ,
    ),
    "ms_dequantize": Case(
        """g (float[2,3] x) => (float[2,3] y) {
        d = com.microsoft.DequantizeLinear(q, scale, zp)
        y = Add(x, d) }""",
        QDQ,
        header=MS_HEADER,
    ),
    "com_microsoft_gelu": Case(
        """g (float[2,3] x) => (float[2,3] y) {
        c = com.microsoft.Gelu(w)
        y = Add(x, c) }""",
        ("w",),
        header=MS_HEADER,
    ),
    "onnx_ml_scaler": Case(
        """g (float[2,3] x) => (float[2,3] y) {
        c = ai.onnx.ml.Scaler<offset = [1.0], scale = [2.0]>(w)
        y = Add(x, c) }""",
        ("w",),
        header=ML_HEADER,
    ),
    "custom_domain": Case(
        """g (float[2,3] x) => (float[2,3] y) {
        c = custom.domain.Double(w)
        y = Add(x, c) }""",
        ("w",),
        runs=False,
        header=CUSTOM_HEADER,
    ),
    "initializer_that_is_an_input": Case(
        """g (float[2,3] x, float[2,3] w) => (float[2,3] y) {
        n = Neg(w)
        y = Add(x, n) }""",
        ("w",),
    ),
    "constant_node_alone": Case(
        """g (float[2,3] x) => (float[2,3] y) {
        k = Constant<value = float[1] {2.0}>()
        y = Mul(x, k) }""",
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_FOLDED))
def test_must_not_fold(case):
    text, names, runs_in_ort, header = NOT_FOLDED[case]
    model = build(text, header, **{name: WEIGHTS[name] for name in names})
    before = ir.to_proto(model).SerializeToString()
    pass_ = FoldConstants()
    candidate, result = apply_pass(pass_, model)
    assert not result.modified and pass_.matches == 0
    assert ir.to_proto(candidate).SerializeToString() == before
    if runs_in_ort:
        check(candidate)
        assert_parity(model, candidate)


def test_no_session_when_nothing_to_fold(monkeypatch):
    sessions = []
    monkeypatch.setattr(runners, "create_session", lambda *a, **k: sessions.append(a))
    text, names, _, header = NOT_FOLDED["downstream_of_dequantize"]
    model = build(text, header, **{name: WEIGHTS[name] for name in names})
    assert not FoldConstants()(model).modified


# -- size guard ----------------------------------------------------------------------------

BLOW_UPS = {
    "constant_of_shape": """g (float[1000,1000] x) => (float[1000,1000] y) {
        s = Constant<value = int64[2] {1000, 1000}>()
        c = ConstantOfShape<value = float[1] {1.0}>(s)
        y = Add(x, c) }""",
    "tile": """g (float[1000,1000] x) => (float[1000,1000] y) {
        r = Constant<value = int64[2] {500, 500}>()
        dead = Neg(small)
        t = Tile(small, r)
        y = Add(x, t) }""",
    "expand": """g (float[1000,1000] x) => (float[1000,1000] y) {
        s = Constant<value = int64[2] {1000, 1000}>()
        e = Expand(cell, s)
        y = Add(x, e) }""",
}


@pytest.mark.parametrize("shapes_known", [False, True])
@pytest.mark.parametrize("case", sorted(BLOW_UPS))
def test_blow_ups_are_not_folded(case, shapes_known):
    small = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    model = build(BLOW_UPS[case], small=small, cell=np.array([[5.0]], np.float32))
    if shapes_known:
        infer_shapes(model)  # the guard then applies before evaluating
    before = ir.to_proto(model).SerializeToString()
    candidate, result = apply_pass(FoldConstants(), model)
    assert not result.modified
    assert ir.to_proto(candidate).SerializeToString() == before  # tensors untouched too
    assert len(before) < 1000
    check(candidate)


def test_blow_up_not_evaluated_when_its_shape_is_known(monkeypatch):
    sessions = []  # a 4 MB tensor must not even be computed
    monkeypatch.setattr(runners, "create_session", lambda *a, **k: sessions.append(a))
    model = build(BLOW_UPS["constant_of_shape"])
    infer_shapes(model)
    assert not FoldConstants()(model).modified
    assert sessions == []


def test_small_results_of_big_intermediates_fold():
    # Tile makes 4 KB, but only its 4-byte sum is kept.
    model = build(
        """g (float[1] x) => (float[1] y) {
        r = Constant<value = int64[2] {16, 16}>()
        t = Tile(small, r)
        s = ReduceSum<keepdims = 0>(t)
        y = Add(x, s) }""",
        small=np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
    )
    candidate, pass_ = fold(model)
    assert [n for n in op_list(candidate) if n != "Constant"] == ["Add"]
    assert folded_values(candidate)["s_folded"].sum() == 16 * 16 * 10.0


def test_weight_still_read_elsewhere_gives_no_budget():
    # w stays (MatMul reads it), so a 2 KB transposed copy would grow the model.
    w = RNG.standard_normal((16, 32)).astype(np.float32)
    assert w.nbytes > SMALL_BYTES
    model = build(
        """g (float[2,16] x) => (float[2,16] y) {
        wt = Transpose(w)
        a = MatMul(x, w)
        y = MatMul(a, wt) }""",
        w=w,
    )
    candidate, result = apply_pass(FoldConstants(), model)
    assert not result.modified
    assert op_list(candidate) == ["Transpose", "MatMul", "MatMul"]


def test_budget_is_shared_by_values_folded_from_one_weight():
    # Two 2 KB values from one 2 KB weight: folding either keeps w alive (the other
    # still reads it), folding both doubles it. Neither may fold.
    w = RNG.standard_normal((16, 32)).astype(np.float32)
    model = build(
        """g (float[2,32] x) => (float[2,16] y) {
        a = Neg(w)
        b = Abs(w)
        t = Transpose(b)
        m = MatMul(x, t)
        n = Gemm<transB = 1>(x, a)
        y = Add(m, n) }""",
        w=w,
    )
    before = size(model)
    candidate, result = apply_pass(FoldConstants(), model)
    assert not result.modified
    assert size(candidate) == before
    check(candidate)
    assert_parity(model, candidate)


def test_split_of_a_weight_folds_every_part():
    w = RNG.standard_normal((3, 32, 32)).astype(np.float32)  # 4 KB per part
    model = build(
        """g (float[2,32] x) => (float[2,32] y) {
        q, k, v = Split<axis = 0, num_outputs = 3>(w)
        q2 = Squeeze(q, zero)
        k2 = Squeeze(k, zero)
        v2 = Squeeze(v, zero)
        a = MatMul(x, q2)
        b = MatMul(a, k2)
        y = MatMul(b, v2) }""",
        w=w,
        zero=np.array([0], np.int64),
    )
    candidate, pass_ = fold(model, feeds=None)
    assert op_list(candidate) == ["MatMul", "MatMul", "MatMul"]
    assert pass_.matches == 3
