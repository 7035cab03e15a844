"""Loading keeps what it must (custom domains, external data); saving is atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from pipeline import load
from pipeline.runtime.errors import UserError


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
    (data_name,) = load.referenced_data_files(target)
    assert data_name.startswith("out.onnx.") and data_name.endswith(".data")
    assert (tmp_path / data_name).stat().st_size == 4096 * 4
    reloaded = onnx.load(target)
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(reloaded.graph.initializer[0]), np.arange(4096, dtype=np.float32)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.data",
        "in.onnx",
        "out.onnx",
        data_name,
    ]


def test_small_model_with_external_input_data_is_saved_self_contained(tmp_path: Path) -> None:
    # The output must never point at the input's data file: saved elsewhere it would not
    # load, saved beside it, it would silently depend on it.
    folder = tmp_path / "in"
    folder.mkdir()
    source = folder / "in.onnx"
    onnx.save(
        _model_with_weight(64),
        source,
        save_as_external_data=True,
        location="in.data",
        size_threshold=0,
    )
    elsewhere = tmp_path / "out"
    elsewhere.mkdir()
    for external_data in (None, False):
        target = elsewhere / f"out-{external_data}.onnx"
        load.save_model(load.load_model(source), target, external_data=external_data)
        assert not any(name.startswith("in.") for name in load.referenced_data_files(target))
        reloaded = onnx.load(target)  # resolves external data beside the output only
        np.testing.assert_array_equal(
            onnx.numpy_helper.to_array(reloaded.graph.initializer[0]), np.arange(64)
        )


def test_resaving_replaces_the_data_file_and_never_pairs_old_and_new(tmp_path: Path) -> None:
    target = tmp_path / "out.onnx"
    first = ir.from_proto(_model_with_weight(256))
    load.save_model(first, target, external_data=True)
    (old_data,) = load.referenced_data_files(target)
    second = ir.from_proto(_model_with_weight(512))
    load.save_model(second, target, external_data=True)
    (new_data,) = load.referenced_data_files(target)
    assert new_data != old_data  # content-named: a crash between renames mixes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", new_data]
    load.save_model(ir.from_proto(_model_with_weight(512)), target, external_data=True)
    assert load.referenced_data_files(target) == {new_data}  # same weights, same name


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


def _loop_model(reverse_body: bool, reverse_main: bool = False) -> onnx.ModelProto:
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Add", ["acc_in", "x"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["acc_out"]),
    ]
    body = helper.make_graph(
        body_nodes[::-1] if reverse_body else body_nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2]),
        ],
    )
    nodes = [
        helper.make_node("Loop", ["n", "t", "x"], ["acc"], body=body),
        helper.make_node("Neg", ["acc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes[::-1] if reverse_main else nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [
            onnx.numpy_helper.from_array(np.array(3, dtype=np.int64), "n"),
            onnx.numpy_helper.from_array(np.array(True), "t"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("reverse_main", [False, True])
def test_nodes_out_of_topological_order_are_sorted_not_rejected(
    tmp_path: Path, reverse_main: bool
) -> None:
    # Node order carries no meaning; the checker and ONNX Runtime reject unsorted (sub)graphs,
    # so loading sorts them (stably) instead of turning the user away.
    path = tmp_path / "unsorted.onnx"
    onnx.save(_loop_model(reverse_body=True, reverse_main=reverse_main), path)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(str(path))
    model = load.load_model(path)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert [n.op_type for n in model.graph] == ["Loop", "Neg"]
    body = [n.op_type for n in model.graph.node(0).attributes["body"].as_graph()]
    assert sorted(body) == ["Add", "Identity", "Relu"]
    assert body.index("Add") < body.index("Relu")


def test_sorting_does_not_hide_an_undefined_value(tmp_path: Path) -> None:
    proto = _loop_model(reverse_body=True)
    proto.graph.node[1].input[0] = "nowhere"
    path = tmp_path / "bad.onnx"
    onnx.save(proto, path)
    with pytest.raises(UserError, match="fails the ONNX checker"):
        load.load_model(path)


def test_map_typed_output_survives_load_and_save(tmp_path: Path) -> None:
    # onnx-ir cannot represent map types (scikit-learn's ZipMap output is seq(map)); they are
    # carried around it and must come back exactly, or ORT rejects the file ("Invalid tensor
    # data type 0").
    graph = helper.make_graph(
        [
            helper.make_node(
                "ZipMap", ["p"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[0, 1]
            )
        ],
        "g",
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 2])],
        [
            helper.make_value_info(
                "probs",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(
                        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, None)
                    )
                ),
            )
        ],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
        ir_version=8,
    )
    onnx.checker.check_model(proto, full_check=True)
    path = tmp_path / "zipmap.onnx"
    onnx.save(proto, path)
    model = load.load_model(path)
    out = tmp_path / "out.onnx"
    load.save_model(model, out)
    saved = onnx.load(out)
    assert saved.graph.output[0].type == proto.graph.output[0].type
    onnx.checker.check_model(saved, full_check=True)
    session = ort.InferenceSession(str(out))
    result = session.run(None, {"p": np.array([[0.25, 0.75]], dtype=np.float32)})[0]
    assert result == [{0: 0.25, 1: 0.75}]


def test_save_writes_no_value_info_for_initializers(tmp_path: Path) -> None:
    # onnx-ir repeats every initializer's dtype and dims in value_info; for a quantized model
    # full of small scales that made a load + save with no change ~8% larger than its input.
    proto = _model_with_weight()
    for i in range(20):
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(np.array(0.5, dtype=np.float32), f"scale_{i}")
        )
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, source)
    model = load.load_model(source)
    before = {v.name: (v.type, v.shape) for v in model.graph.initializers.values()}
    load.save_model(model, target)
    saved = onnx.load(target)
    assert list(saved.graph.value_info) == []
    assert target.stat().st_size <= source.stat().st_size
    assert {v.name: (v.type, v.shape) for v in model.graph.initializers.values()} == before
    assert before["w"][0] == ir.TensorType(ir.DataType.FLOAT)
