"""fuse_attention on all-MiniLM-L6-v2 (real weights) as four exporters write it: optimum, the
legacy torch exporter with eager and with SDPA attention, and the dynamo exporter.

After the default passes plus fuse_attention, every one of the 6 layers must be one
``com.microsoft.Attention`` fed with the raw mask, and the model must match the export within
1e-4 for left padding, right padding and holes (where ORT's own optimizer, which turns the mask
into sequence lengths, is off by more than 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.fusions.attention import FuseAttention
from graph_passes.registry import create_pass
from graph_passes.target.targets import Target
from pipeline.pass_manager import VerifiedPassManager
from pipeline.recipe import load_recipe
from pipeline.runtime import inputs
from pipeline.runtime import sessions as runners
from pipeline.runtime.compare import Tolerance
from pipeline.verify import Verifier

VARIANTS = {  # id: (exporter, attn_implementation)
    "optimum": ("optimum", "sdpa"),
    "legacy-eager": ("torch-legacy", "eager"),
    "legacy-sdpa": ("torch-legacy", "sdpa"),
    "dynamo-sdpa": ("torch-dynamo", "sdpa"),
}
LAYERS = 6
TOL = 1e-4


def pass_names() -> list[str]:
    """The default recipe with fuse_attention right after fuse_layer_norm."""
    names = [n for n in load_recipe("default").passes if n != "fuse_attention"]
    return (
        names[: names.index("fuse_layer_norm") + 1]
        + ["fuse_attention"]
        + names[names.index("fuse_layer_norm") + 1 :]
    )


def optimize(model: ir.Model, target: Target) -> tuple[ir.Model, int]:
    """Apply the passes to a fixed point with the pass manager (checker only: no reference
    run, the test compares outputs itself)."""
    manager = VerifiedPassManager(
        pass_names(),
        Verifier([], None, Tolerance()),
        pass_factory=lambda name: (
            FuseAttention(target) if name == "fuse_attention" else create_pass(name, target)
        ),
    )
    result = manager.run(model)
    assert result.rolled_back == {}
    fused = sum(r.matches for r in result.records if r.name == "fuse_attention" and r.modified)
    return result.model, fused


def padding_masks(seq: int = 11, batch: int = 3) -> tuple[np.ndarray, ...]:
    """Left padding, right padding and holes (batch 3, 11 tokens): the masks a fused
    attention must honour exactly."""
    right = np.ones((batch, seq), np.int64)
    right[0, 7:] = 0
    right[1, 4:] = 0
    left = right[:, ::-1].copy()
    holes = np.ones((batch, seq), np.int64)
    holes[0, 2::3] = 0
    holes[1, 5:8] = 0
    holes[2, [1, 9]] = 0
    return left, right, holes


def mask_feeds(seq: int = 11, batch: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 20000, (batch, seq)).astype(np.int64)
    ids[:, 0] = 101
    return [
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        for mask in padding_masks(seq, batch)
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("minilm-fusion")
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            from models import minilm

            exporter, attn = VARIANTS[variant]
            if exporter == "optimum":
                pytest.importorskip("optimum.exporters.onnx")
            path = folder / f"{variant}.onnx"
            minilm.export_minilm(path, exporter=exporter, attn_implementation=attn)
            cache[variant] = path
        return cache[variant]

    return get


def test_attn_implementation_is_checked(tmp_path: Path) -> None:
    from models import minilm

    with pytest.raises(ValueError, match="attn_implementation"):
        minilm.export_minilm(tmp_path / "m.onnx", attn_implementation="flash")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_layer_fused_and_exact_for_any_padding(variant: str, exported) -> None:
    path = exported(variant)
    reference = ir.load(path)
    model, fused = optimize(ir.load(path), Target("cpu"))
    assert fused == LAYERS
    ops = [(n.domain, n.op_type) for n in model.graph]
    assert ops.count(("com.microsoft", "Attention")) == LAYERS
    assert ("", "Softmax") not in ops
    assert ops.count(("", "Cast")) <= 2  # one shared int32 mask (+ at most one kept by the model)
    for node in model.graph:
        if node.op_type == "Attention":
            assert node.inputs[3].producer().inputs[0].name == "attention_mask"
    ref = runners.create_session(reference, optimization="disable_all")
    cand = runners.create_session(model, optimization="disable_all")
    names = {v.name for v in reference.graph.inputs}
    sets = mask_feeds() + inputs.generate_input_sets(reference, seed=1)
    for feed in sets:
        feed = {k: v for k, v in feed.items() if k in names}
        expected, actual = ref.run(feed), cand.run(feed)
        # optimum's export also returns the pooled sentence embedding; every output counts
        for name in ref.output_names:
            error = float(np.abs(np.asarray(actual[name]) - np.asarray(expected[name])).max())
            assert error <= TOL, f"{variant} {name}: error {error:.2e}, {feed['attention_mask']}"
