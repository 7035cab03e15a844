"""Loading keeps what it must (custom domains, external data); saving is atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from pipeline import load
from pipeline.errors import UserError


def _model_with_weight(size: int = 64) -> onnx.ModelProto:
    weight = onnx.numpy_helper.from_array(np.arange(size, dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "w"], ["y"]),
            helper.make_node("MyOp", ["y"], ["z"], domain="com.example"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [size])],
        [weight],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )


def test_custom_domain_survives_load_and_save(tmp_path: Path) -> None:
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_model_with_weight(), source)
    model = load.load_model(source)
    load.save_model(model, target)
    saved = onnx.load(target)
    assert [(n.domain, n.op_type) for n in saved.graph.node] == [
        ("", "Add"),
        ("com.example", "MyOp"),
    ]
    assert {o.domain: o.version for o in saved.opset_import} == {"": 17, "com.example": 1}


def test_external_data_loads_lazily_and_saves_on_request(tmp_path: Path) -> None:
    source = tmp_path / "in.onnx"
    onnx.save(
        _model_with_weight(4096),
        source,
        save_as_external_data=True,
        location="in.data",
        size_threshold=0,
    )
    model = load.load_model(source)
    weight = model.graph.initializers["w"].const_value
    assert isinstance(weight, ir.ExternalTensor)
    target = tmp_path / "out.onnx"
    load.save_model(model, target, external_data=True)
    assert (tmp_path / "out.onnx.data").stat().st_size == 4096 * 4
    reloaded = onnx.load(target)
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(reloaded.graph.initializer[0]), np.arange(4096, dtype=np.float32)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.data",
        "in.onnx",
        "out.onnx",
        "out.onnx.data",
    ]


def test_failed_save_leaves_previous_file_and_no_debris(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")
    model = ir.from_proto(_model_with_weight())

    def half_write(model, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(load.ir, "save", half_write)
    with pytest.raises(UserError, match="No space left"):
        load.save_model(model, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_model_failing_checker_is_a_user_error(tmp_path: Path) -> None:
    model = _model_with_weight()
    model.graph.node[0].input[1] = "undefined_value"
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(UserError):
        load.load_model(path)
