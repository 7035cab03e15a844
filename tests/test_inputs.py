"""Generated inputs must be able to find bugs: varied dynamic sizes, valid ids, padded masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graph_passes.testing.helpers import model_from_text
from pipeline.runtime import inputs
from pipeline.runtime.errors import UserError

ENCODER = (
    """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[batch, seq] input_ids, int64[batch, seq] attention_mask, float[batch, 3, H, W] image)
  => (float[batch, seq, 4] y, float[batch, 3, H, W] z) {
  table = Constant<value = float[30, 4] {"""
    + ", ".join(["0.5"] * 120)
    + """}>()
  y = Gather<axis = 0>(table, input_ids)
  z = Relu(image)
}
"""
)


def test_every_dynamic_dim_takes_two_sizes_and_batch_above_one() -> None:
    sets = inputs.generate_input_sets(model_from_text(ENCODER))
    assert len(sets) == 2
    shapes = [{k: v.shape for k, v in s.items()} for s in sets]
    assert shapes[0]["input_ids"] == shapes[0]["attention_mask"]  # shared symbols agree
    assert shapes[0]["input_ids"] != shapes[1]["input_ids"]
    assert all(s["input_ids"][0] > 1 for s in shapes)
    assert shapes[0]["image"][2:] != shapes[1]["image"][2:]
    assert shapes[0]["image"][2] % 32 == 0  # strided CNNs stay valid


def test_ids_stay_inside_the_gathered_table() -> None:
    for feeds in inputs.generate_input_sets(model_from_text(ENCODER), seed=3):
        ids = feeds["input_ids"]
        assert ids.min() >= 0 and ids.max() < 30
        assert ids.max() > 3  # the table's range is used, not a tiny default


def test_masks_cover_right_left_padding_and_holes() -> None:
    rows = [
        row
        for feeds in inputs.generate_input_sets(model_from_text(ENCODER))
        for row in feeds["attention_mask"]
    ]
    kinds = set()
    for row in rows:
        zeros = np.flatnonzero(row == 0)
        if zeros.size == 0:
            kinds.add("full")
        elif zeros[-1] == len(row) - 1 and np.all(np.diff(zeros) == 1):
            kinds.add("right")
        elif zeros[0] == 0 and np.all(np.diff(zeros) == 1):
            kinds.add("left")
        else:
            kinds.add("holes")
    assert {"right", "left", "holes"} <= kinds


def test_input_shape_override_is_used_and_checked() -> None:
    model = model_from_text(ENCODER)
    sets = inputs.generate_input_sets(model, {"image": (1, 3, 224, 160)})
    assert all(s["image"].shape == (1, 3, 224, 160) for s in sets)
    with pytest.raises(UserError, match="fixes it to 3"):
        inputs.generate_input_sets(model, {"image": (1, 4, 224, 224)})
    with pytest.raises(UserError, match="rank"):
        inputs.generate_input_sets(model, {"image": (1, 3, 224)})


@pytest.mark.parametrize("text", ["x", "x=", "=1,2", "x=1,a", "x=-1,2"])
def test_malformed_shape_text_is_a_user_error(text: str) -> None:
    if text == "x=":
        assert inputs.parse_shape_overrides([text]) == {"x": ()}
        return
    with pytest.raises(UserError):
        inputs.parse_shape_overrides([text])


def test_user_data_npz_and_npy_folder(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 4), np.float32))
    np.save(tmp_path / "x.npy", np.ones((3, 4), np.float32))
    sets = inputs.load_user_inputs(tmp_path)
    assert [s["x"].shape for s in sets] == [(2, 4), (3, 4)]
    assert inputs.load_user_inputs(tmp_path / "a.npz")[0]["x"].shape == (2, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .npz"):
        inputs.load_user_inputs(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        inputs.load_user_inputs(tmp_path / "missing.npz")


def test_distinct_dynamic_dims_of_one_kind_differ_within_a_set() -> None:
    # H and W of an image (or two anonymous dims) must not be equal in a generated set, or a
    # pass that swaps or confuses them (a Reshape to [N, C, H*H]) goes unnoticed.
    for feeds in inputs.generate_input_sets(model_from_text(ENCODER)):
        height, width = feeds["image"].shape[2:]
        assert height != width
        assert height % 32 == 0 and width % 32 == 0


def test_scalar_inputs_are_arrays_onnx_runtime_accepts() -> None:
    # numpy on shape () gives numpy scalars, which ORT rejects for bool
    # ("Unable to handle object of type <class 'numpy.bool'>").
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper

    scalars = [("flag", TensorProto.BOOL), ("n", TensorProto.INT64), ("x", TensorProto.FLOAT)]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info(name, kind, []) for name, kind in scalars],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = ir.from_proto(
        helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    )
    for feeds in [*inputs.generate_input_sets(model), inputs.minimal_input_set(model)]:
        assert all(isinstance(v, np.ndarray) and v.shape == () for v in feeds.values())


def test_a_dim_named_as_a_sum_of_symbols_gets_the_sum() -> None:
    # optimum's decoder exports name the mask length "past_sequence_length + sequence_length".
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[batch, sequence_length] ids, float[batch, 2, past_sequence_length, 4] past,
           int64[batch, "past_sequence_length + sequence_length"] mask) => (int64[batch] y) {
            y = ReduceSum<keepdims=0>(ids)
        }
        """
    )
    for feeds in [*inputs.generate_input_sets(model), inputs.minimal_input_set(model)]:
        past, seq = feeds["past"].shape[2], feeds["ids"].shape[1]
        assert feeds["mask"].shape == (feeds["ids"].shape[0], past + seq)
