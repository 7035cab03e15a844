"""Targets decide which fused ops may be emitted: probed contrib kernels, portable = standard."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from graph_passes.registry import create_pass
from graph_passes.target.targets import Target
from pipeline.recipe import load_recipe
from pipeline.runtime.errors import UserError


def _contrib(op_type: str, dtypes: list[ir.DataType], **ints: int) -> ir.Node:
    inputs = [ir.Value(name=f"x{i}", type=ir.TensorType(d)) for i, d in enumerate(dtypes)]
    attributes = [ir.AttrInt64(k, v) for k, v in ints.items()]
    return ir.Node("com.microsoft", op_type, inputs, attributes=attributes)


F32 = ir.DataType.FLOAT


@pytest.mark.parametrize(
    "op_type, n", [("BiasGelu", 2), ("FastGelu", 2), ("SkipLayerNormalization", 3)]
)
def test_cpu_target_accepts_contrib_ops_with_a_cpu_kernel(op_type, n):
    assert Target("cpu").supports(_contrib(op_type, [F32] * n))


def test_unregistered_contrib_op_is_refused():
    assert not Target("cpu").supports(_contrib("NoSuchFusedOp", [F32]))


def test_contrib_op_with_input_types_its_kernel_lacks_is_refused():
    assert not Target("cpu").supports(_contrib("BiasGelu", [ir.DataType.INT32] * 2))


def test_portable_target_never_accepts_contrib_ops():
    node = _contrib("BiasGelu", [F32, F32])
    assert Target("cpu").supports(node)
    assert not Target("portable").supports(node)


def test_cuda_target_needs_a_listed_cuda_kernel():
    # FastGelu has CPU and CUDA kernels; a made-up op has neither.
    assert Target("cuda").supports(_contrib("FastGelu", [F32, F32]))
    assert not Target("cuda").supports(_contrib("NoSuchFusedOp", [F32]))


def test_standard_fused_ops_need_their_opset():
    target = Target("portable")
    assert not target.allows_standard("LayerNormalization", 16)
    assert target.allows_standard("LayerNormalization", 17)
    assert not target.allows_standard("Gelu", 19)
    assert target.allows_standard("Gelu", 20)
    assert not target.allows_standard("Attention", 22)


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError, match="target must be one of"):
        Target("tpu")


def test_passes_receive_the_target():
    assert create_pass("fuse_layer_norm", Target("portable")).target.name == "portable"
    assert create_pass("fuse_layer_norm").target.name == "cpu"


def test_recipe_target_overrides_and_validation():
    recipe = load_recipe("default")
    assert recipe.target == "cpu"
    assert recipe.with_overrides(target="portable", raise_opset_to=17).target == "portable"
    with pytest.raises(UserError, match="target must be one of"):
        recipe.with_overrides(target="tpu")
    with pytest.raises(UserError, match="raise_opset_to"):
        recipe.with_overrides(raise_opset_to=99)


def test_cli_portable_contradicting_target_is_a_usage_error(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "optimize.py", str(tmp_path / "m.onnx"), "--portable", "--target", "cpu"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "--portable contradicts --target cpu" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
