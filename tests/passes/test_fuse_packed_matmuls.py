"""fuse_packed_matmuls: MatMuls reading the same activation become one MatMul on concatenated
weights and a Split; other K, non-constant weights and graph outputs are left."""

from __future__ import annotations

import numpy as np

from graph_passes.fusions.packed_matmuls import FusePackedMatMuls
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list


def weights(*shapes: tuple[int, int]) -> str:
    rng = np.random.default_rng(0)
    lines = []
    for i, (k, n) in enumerate(shapes):
        values = ", ".join(f"{v:.4f}" for v in rng.standard_normal(k * n))
        lines.append(f"float[{k}, {n}] w{i} = {{{values}}}")
    return ", ".join(lines)


def graph(body: str, outputs: str, shapes, opset: int = 17) -> str:
    declared = ", ".join(f"float[N, S, {n}] {name}" for name, n in outputs)
    return f"""<ir_version: 8, opset_import: ["" : {opset}]>
g (float[N, S, 4] x, float[N, S, 6] z) => ({declared}) <{weights(*shapes)}> {{
  {body}
}}"""


def run(text: str) -> tuple[list[str], FusePackedMatMuls, object]:
    model = model_from_text(text)
    pass_ = FusePackedMatMuls()
    candidate, result = apply_pass(pass_, model)
    assert result.modified == (pass_.matches > 0)
    check(candidate)
    assert_parity(model, candidate, rtol=1e-6, atol=1e-6)
    assert [v.name for v in candidate.graph.outputs] == [v.name for v in model.graph.outputs]
    assert not FusePackedMatMuls()(candidate.clone()).modified, "second run must find nothing"
    return op_list(candidate), pass_, candidate


def test_three_projections_of_one_input_become_one_matmul_and_a_split():
    body = """q = MatMul(x, w0)
  k = MatMul(x, w1)
  v = MatMul(x, w2)
  a = Relu(q)
  b = Relu(k)
  c = Relu(v)"""
    ops, pass_, model = run(graph(body, [("a", 5), ("b", 3), ("c", 3)], [(4, 5), (4, 3), (4, 3)]))
    assert ops == ["MatMul", "Split", "Relu", "Relu", "Relu"] and pass_.matches == 1
    packed = model.graph.node(0).inputs[1]
    assert packed.shape == (4, 11)
    assert not {"w0", "w1", "w2"} & set(model.graph.initializers)  # only the packed copy


def test_other_inputs_other_k_and_outputs_are_left():
    body = """p = MatMul(x, w0)
  o = MatMul(z, w1)
  y = MatMul(x, w2)
  a = Relu(p)"""
    text = graph(body, [("a", 5), ("o", 3), ("y", 3)], [(4, 5), (6, 3), (4, 3)])
    ops, pass_, _ = run(text)  # y is a graph output: it keeps its own MatMul
    assert pass_.matches == 0 and ops.count("MatMul") == 3


def test_old_opsets_take_split_sizes_as_an_attribute():
    body = """q = MatMul(x, w0)
  k = MatMul(x, w1)
  a = Relu(q)
  b = Relu(k)"""
    ops, pass_, model = run(graph(body, [("a", 5), ("b", 3)], [(4, 5), (4, 3)], opset=11))
    split = next(n for n in model.graph if n.op_type == "Split")
    assert list(split.attributes["split"].as_ints()) == [5, 3] and len(split.inputs) == 1


def test_two_groups_of_unnamed_matmuls_stay_loadable():
    """The fuzzer's find: naming both packed nodes "_packed" made ORT reject the model."""
    body = """p = MatMul(x, w0)
  q = MatMul(x, w1)
  r = MatMul(z, w2)
  s = MatMul(z, w3)
  a = Add(p, q)
  b = Add(r, s)"""
    ops, pass_, _ = run(graph(body, [("a", 3), ("b", 3)], [(4, 3), (4, 3), (6, 3), (6, 3)]))
    assert pass_.matches == 2 and ops.count("Split") == 2
