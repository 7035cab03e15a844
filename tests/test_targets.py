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


def test_cuda_target_needs_a_cuda_kernel_the_fusion_declares():
    # FastGelu has CPU and CUDA kernels; a contrib op fuse_gelu does not declare for CUDA
    # (it has a CPU kernel) and a made-up op are refused.
    gelu = create_pass("fuse_gelu", Target("cuda"))
    assert gelu.can_emit(_contrib("FastGelu", [F32, F32]))
    assert not gelu.can_emit(_contrib("SkipLayerNormalization", [F32] * 3))
    assert not gelu.can_emit(_contrib("NoSuchFusedOp", [F32]))
    assert create_pass("fuse_gelu", Target("cpu")).can_emit(_contrib("FastGelu", [F32, F32]))


@pytest.mark.parametrize(
    "fusion, op_type, opset",
    [("fuse_layer_norm", "LayerNormalization", 17), ("fuse_gelu", "Gelu", 20)]
    + [("fuse_attention", "Attention", 23), ("fuse_rms_norm", "RMSNormalization", 23)],
)
def test_standard_fused_ops_need_their_opset(fusion, op_type, opset):
    fuse = create_pass(fusion, Target("portable"))
    assert not fuse.can_emit_standard(op_type, opset - 1)
    assert fuse.can_emit_standard(op_type, opset)


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
