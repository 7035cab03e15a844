"""fuse_silu: x * Sigmoid(x) becomes one com.microsoft QuickGelu(alpha=1) where the target has
the kernel and it is not measured slower; shared sigmoids, other operands and portable
targets are left."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fusions.silu import FuseSilu
from graph_passes.target import kernel_timing
from graph_passes.target.targets import Target
from graph_passes.testing.helpers import apply_pass, assert_parity, check, model_from_text, op_list


def graph(body: str, dtype: str = "float", outputs: str = "y") -> str:
    declared = ", ".join(f"{dtype}[N, 8] {name}" for name in outputs.split(", "))
    return f"""<ir_version: 10, opset_import: ["" : 17]>
g ({dtype}[N, 8] x, {dtype}[N, 8] z) => ({declared}) {{
  {body}
}}"""


def run(text: str, target: Target | None = None) -> tuple[list[str], FuseSilu]:
    model = model_from_text(text)
    pass_ = FuseSilu(target)
    candidate, result = apply_pass(pass_, model)
    assert result.modified == (pass_.matches > 0)
    check(candidate)
    assert_parity(model, candidate, rtol=1e-5, atol=1e-6)
    assert [v.name for v in candidate.graph.outputs] == [v.name for v in model.graph.outputs]
    assert not FuseSilu(target)(candidate.clone()).modified, "second run must find nothing"
    return op_list(candidate), pass_


@pytest.mark.parametrize("mul", ["y = Mul(x, s)", "y = Mul(s, x)"])
def test_silu_in_either_operand_order_becomes_quick_gelu(mul):
    ops, pass_ = run(graph(f"s = Sigmoid(x)\n  {mul}"))
    assert ops == ["QuickGelu"] and pass_.matches == 1


def test_the_fused_node_is_silu_exactly():
    model = model_from_text(graph("s = Sigmoid(x)\n  y = Mul(x, s)"))
    candidate, _ = apply_pass(FuseSilu(), model)
    (node,) = list(candidate.graph)
    assert node.domain == "com.microsoft"
    assert node.attributes.get_float("alpha") == 1.0
    assert candidate.opset_imports.get("com.microsoft") == 1


@pytest.mark.parametrize(
    "body, outputs",
    [
        ("s = Sigmoid(x)\n  y = Mul(z, s)", "y"),  # x * sigmoid(z) is not SiLU
        ("s = Sigmoid(x)\n  y = Mul(x, s)\n  w = Neg(s)", "y, w"),  # the sigmoid is shared
        ("s = Sigmoid(x)\n  y = Mul(x, s)", "y, s"),  # the sigmoid is a graph output
    ],
)
def test_not_silu_or_not_private_is_left(body, outputs):
    ops, pass_ = run(graph(body, outputs=outputs))
    assert "QuickGelu" not in ops and pass_.matches == 0


def test_portable_target_has_no_quick_gelu():
    ops, _ = run(graph("s = Sigmoid(x)\n  y = Mul(x, s)"), Target("portable"))
    assert ops == ["Sigmoid", "Mul"]


def test_a_target_without_the_kernel_is_left(monkeypatch):
    # e.g. bfloat16, which ORT's CPU QuickGelu lacks (probed): the probe has the last word
    asked = []

    def no_kernel(self, node):
        asked.append((node.op_type, node.inputs[0].dtype))
        return False

    monkeypatch.setattr(Target, "supports", no_kernel)
    ops, _ = run(graph("s = Sigmoid(x)\n  y = Mul(x, s)"))
    assert ops == ["Sigmoid", "Mul"]
    assert set(asked) == {("QuickGelu", ir.DataType.FLOAT)}


def test_measured_slower_is_declined(monkeypatch, tmp_path):
    monkeypatch.setenv("OVO_CACHE_DIR", str(tmp_path))
    seen = []

    def slower(original, candidate, threads, shadows):
        seen.append(tuple(shadows))
        return 1.4, 9, kernel_timing._verdict([1.4] * 9), 0.0

    monkeypatch.setattr(kernel_timing, "_measure", slower)
    ops, pass_ = run(graph("s = Sigmoid(x)\n  y = Mul(x, s)"), Target("cpu", time_kernels=True))
    assert ops == ["Sigmoid", "Mul"] and pass_.declined == 1
    assert seen == [FuseSilu.shadows]


def test_parity_on_real_values():
    model = model_from_text(graph("s = Sigmoid(x)\n  y = Mul(x, s)"))
    candidate, _ = apply_pass(FuseSilu(), model)
    rng = np.random.default_rng(0)
    feeds = {
        "x": (rng.standard_normal((3, 8)) * 6).astype(np.float32),
        "z": np.zeros((3, 8), np.float32),
    }
    assert_parity(model, candidate, [feeds], rtol=1e-5, atol=1e-6)
