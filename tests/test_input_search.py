"""Generated inputs are a search: -1 dims are dynamic, too-small sizes grow, a decoder's mask
spans past + new tokens, and a model no plan can run gets an exact hint (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from pipeline.runtime import inputs
from tests.test_cli import run_cli


def _save(tmp_path: Path, nodes, inputs_, outputs, inits=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs_, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def _optimize(model: Path, tmp_path: Path, *extra: str):
    report = tmp_path / "r.json"
    done = run_cli(model, "-o", tmp_path / "o.onnx", "--report", report, "--no-speed-check", *extra)
    return done, (json.loads(report.read_text()) if report.exists() else None)


def _paddle_style(tmp_path: Path) -> Path:
    # Paddle writes -1 for "any size": x is [-1, 3, -1, -1].
    return _save(
        tmp_path,
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, -1, -1])],
    )


def test_minus_one_dims_are_dynamic(tmp_path):
    sets = inputs.generate_input_sets(ir.from_proto(onnx.load(_paddle_style(tmp_path))))
    shapes = [s["x"].shape for s in sets]
    assert all(d > 0 for shape in shapes for d in shape)
    assert shapes[0] != shapes[1]  # dynamic: two sizes, like a dim_param
    done, report = _optimize(_paddle_style(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    assert report["parity"]["passed"]


def _reflect_pad(tmp_path: Path) -> Path:
    # Reflect padding by 20 needs more than 20 samples: the default sizes (2, 3) and x4
    # (8, 12) fail, x16 (32, 48) runs.
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, 20, 0, 20])
    return _save(
        tmp_path,
        [
            helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
            helper.make_node("Identity", ["p"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None])],
        [pads],
    )


def test_too_short_inputs_grow_until_the_model_runs(tmp_path):
    done, report = _optimize(_reflect_pad(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    search = report["inputs"]["search"]
    assert [a["plan"] for a in search] == [
        "the default sizes",
        "longer non-batch dynamic dimensions (x4)",
        "longer non-batch dynamic dimensions (x16)",
    ]
    assert search[0]["error"] and search[1]["error"] and search[2]["error"] is None
    assert search[2]["shapes"]["x"] == [2, 32]
    assert report["parity"]["passed"]
    assert any("verified with longer" in w for w in report["warnings"])


def _past_mask(tmp_path: Path) -> Path:
    # A decoder-like graph whose mask must be as long as past + new tokens, with the mask's
    # length named apart from both (no "past + sequence" in its name).
    return _save(
        tmp_path,
        [
            helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["past", "axes"], ["ps"], keepdims=0),
            helper.make_node("Concat", ["ps", "ids"], ["cat"], axis=1),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["cat", "m"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 2, "past_seq", 4]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "mlen"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 3])],
    )


def test_a_decoder_mask_is_tried_as_past_plus_new_tokens(tmp_path):
    done, report = _optimize(_past_mask(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    chosen = report["inputs"]["search"][-1]
    assert chosen["plan"] == "the attention mask spanning past + new tokens"
    shapes = chosen["shapes"]
    assert shapes["attention_mask"][1] == shapes["past"][2] + shapes["input_ids"][1]


def test_no_runnable_inputs_exit_2_with_the_node_and_exact_options(tmp_path):
    # Reshape to 7 x 11 runs only when x holds exactly 77 values: no generated plan does.
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [7, 11])
    path = _save(
        tmp_path,
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="to_7x11")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 11])],
        [shape],
    )
    done, _ = _optimize(path, tmp_path)
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "at Reshape node 'to_7x11'" in message
    assert "--input-shape x=2,2" in message and "--inputs DIR" in message
    assert message.index("--inputs") < message.index("--allow-unverified")
    assert not (tmp_path / "o.onnx").exists()
    # The hint works: the shape it names, with sizes the model accepts, runs.
    done, report = _optimize(path, tmp_path, "--input-shape", "x=7,11")
    assert done.returncode == 0, done.stderr
    assert np.prod(report["inputs"]["sets"][0]["x"]["shape"]) == 77


def _speech_front_end(tmp_path: Path) -> Path:
    """What silero VAD does: a sample rate compared with 16000 picks the ``If`` branch (the
    other one fails on any input), the batch axis is squeezed (batch 1 only), and a reflect
    pad of 200 needs more than 200 samples: no plan but batch 1 with a long sample axis and
    sr = 16000 runs."""
    pads = helper.make_tensor("pads", TensorProto.INT64, [2], [200, 200])
    huge = helper.make_tensor("huge", TensorProto.INT64, [2], [100000, 100000])
    rate = helper.make_tensor("rate", TensorProto.INT64, [], [16000])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    out = helper.make_tensor_value_info
    branch = {
        name: helper.make_graph(
            [helper.make_node("Pad", ["s", amount], [f"{name}_y"], mode="reflect")],
            name,
            [],
            [out(f"{name}_y", TensorProto.FLOAT, [None])],
        )
        for name, amount in (("then", "pads"), ("otherwise", "huge"))
    }
    return _save(
        tmp_path,
        [
            helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
            helper.make_node("Squeeze", ["x", "axes"], ["s"]),
            helper.make_node(
                "If", ["is16k"], ["y"], then_branch=branch["then"], else_branch=branch["otherwise"]
            ),
        ],
        [
            out("x", TensorProto.FLOAT, [None, None]),
            out("sr", TensorProto.INT64, []),
        ],
        [out("y", TensorProto.FLOAT, [None])],
        [pads, huge, rate, axes],
    )


def test_a_compared_scalar_gets_the_constant_and_one_axis_grows(tmp_path):
    model = ir.from_proto(onnx.load(_speech_front_end(tmp_path)))
    assert [s["sr"].item() for s in inputs.generate_input_sets(model)] == [16000, 16000]
    done, report = _optimize(_speech_front_end(tmp_path), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    last = report["inputs"]["search"][-1]
    assert last["error"] is None, report["inputs"]["search"]
    assert last["plan"] == "every dynamic dimension at 1 but axis 1 of the rank-2 inputs at 512"
    assert last["shapes"] == {"x": [1, 512], "sr": []}
    assert report["parity"]["passed"]


def test_a_mask_compared_with_zero_is_not_all_zeros(tmp_path):
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    path = _save(
        tmp_path,
        [helper.make_node("Equal", ["mask", "zero"], ["y"])],
        [helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, ["batch", "sequence"])],
        [zero],
    )
    sets = inputs.generate_input_sets(ir.from_proto(onnx.load(path)))
    assert all(s["mask"].any() for s in sets)
