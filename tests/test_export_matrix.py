"""Fusions that generalize (issue 15): the same tiny BERT exported many ways must fuse fully.

A tiny ``BertModel`` (hidden 64, 2 layers, 4 heads, intermediate 128, vocab 1000, random
weights with fixed seeds; nothing is downloaded) is exported by

- the legacy TorchScript exporter, eager and SDPA attention, at opsets 14 to 20;
- the dynamo exporter with its optimizer (``optimize=True``) and without (``optimize=False``),
  eager and SDPA attention, at the opset it picks itself;
- Optimum's ``main_export`` (skipped when ``optimum.exporters.onnx`` is not importable);

with and without a ``token_type_ids`` input, and through a wrapper module that returns either
the ``last_hidden_state`` tensor alone or the ``(last_hidden_state, pooler_output)`` tuple.

The full cross product is 2x7x4 = 56 legacy + 2x2x4 = 16 dynamo + optimum exports; that is more
than this suite should pay for, so the matrix is a pairwise covering design (``CASES``): for
each torch exporter, every pair of values of any two of its axes appears at least once. Legacy
(axes attention, opset, token_type_ids, wrapper): each (attention, opset) once, 14 exports,
the two of an opset differing in both token_type_ids and wrapper, so every opset and every
attention implementation sees both values of each (``test_legacy_cases_cover_every_pair``
checks it). Dynamo: each (optimize, attention) sees both token_type_ids values and both
wrappers. Dropped: the combinations whose every *pair* of axis values is already in the matrix
(the exporters' graphs differ by exporter, opset and attention implementation; token_type_ids
and the wrapper only change the embedding sum and the graph outputs, which do not interact
with the opset). Optimum decides its own inputs (``token_type_ids`` always) and outputs, so it
has no wrapper/tti axis.

After the default recipe's passes (no kernel timing, so timing cannot decline a fusion), every
export must have: one ``com.microsoft.Attention`` per layer and no Softmax; every layer norm
fused (LayerNormalization/SkipLayerNormalization, no ReduceMean left); every GELU fused (no
Erf left); and the same outputs as the export for left padding, right padding and holes.
"""

from __future__ import annotations

import inspect
import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graph_passes.registry import create_pass
from graph_passes.target.targets import Target
from pipeline.pass_manager import VerifiedPassManager
from pipeline.recipe import load_recipe
from pipeline.runtime import sessions as runners
from pipeline.runtime.compare import Tolerance
from pipeline.verify import Verifier
from tests.test_minilm_fusion import padding_masks

pytestmark = pytest.mark.slow

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB = 64, 2, 4, 128, 1000
NORMS = 2 * LAYERS + 1  # the embedding LayerNorm and two per layer
TOL = 1e-4


@dataclass(frozen=True)
class Case:
    exporter: str  # legacy | dynamo | dynamo-noopt | optimum
    attn: str = "sdpa"  # eager | sdpa (torch exporters)
    opset: int | None = None  # legacy and optimum; dynamo picks its own
    tti: bool = True  # a token_type_ids input
    wrapper: str = "tensor"  # tensor | tuple

    @property
    def id(self) -> str:
        opset = f"-op{self.opset}" if self.opset else ""
        if self.exporter == "optimum":
            return f"optimum{opset}"
        tti = "tti" if self.tti else "notti"
        return f"{self.exporter}-{self.attn}{opset}-{tti}-{self.wrapper}"


CASES = [
    # legacy: each (attn, opset) once; the two cases of an opset differ in tti and wrapper,
    # so each attn and each opset sees tti/no tti and tuple/tensor, and every (tti, wrapper)
    # pair appears
    Case("legacy", "eager", 14, True, "tuple"),
    Case("legacy", "eager", 15, False, "tuple"),
    Case("legacy", "eager", 16, True, "tuple"),
    Case("legacy", "eager", 17, False, "tensor"),
    Case("legacy", "eager", 18, True, "tensor"),
    Case("legacy", "eager", 19, False, "tuple"),
    Case("legacy", "eager", 20, True, "tensor"),
    Case("legacy", "sdpa", 14, False, "tensor"),
    Case("legacy", "sdpa", 15, True, "tensor"),
    Case("legacy", "sdpa", 16, False, "tensor"),
    Case("legacy", "sdpa", 17, True, "tuple"),
    Case("legacy", "sdpa", 18, False, "tuple"),
    Case("legacy", "sdpa", 19, True, "tensor"),
    Case("legacy", "sdpa", 20, False, "tuple"),
    # dynamo with and without its optimizer: each (optimize, attn) sees both tti values and
    # both wrappers
    Case("dynamo", "sdpa", None, True, "tuple"),
    Case("dynamo", "sdpa", None, False, "tensor"),
    Case("dynamo", "eager", None, True, "tensor"),
    Case("dynamo", "eager", None, False, "tuple"),
    Case("dynamo-noopt", "sdpa", None, True, "tensor"),
    Case("dynamo-noopt", "sdpa", None, False, "tuple"),
    Case("dynamo-noopt", "eager", None, True, "tuple"),
    Case("dynamo-noopt", "eager", None, False, "tensor"),
    Case("optimum", opset=14),
    Case("optimum", opset=17),
]


def test_legacy_cases_cover_every_pair() -> None:
    """The legacy cases are a pairwise covering design of their four axes (module docstring)."""
    rows = [(c.attn, c.opset, c.tti, c.wrapper) for c in CASES if c.exporter == "legacy"]
    axes = [("eager", "sdpa"), tuple(range(14, 21)), (True, False), ("tensor", "tuple")]
    for i, j in itertools.combinations(range(len(axes)), 2):
        seen = {(row[i], row[j]) for row in rows}
        assert seen == set(itertools.product(axes[i], axes[j])), (i, j)
    assert len(rows) == len(axes[0]) * len(axes[1])  # each (attention, opset) once


def _dynamo_has_optimize() -> bool:
    import torch

    return "optimize" in inspect.signature(torch.onnx.export).parameters


def tiny_config(attn: str):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=128,
        hidden_act="gelu",
        attn_implementation=attn,
    )


def tiny_bert(attn: str):
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(tiny_config(attn), add_pooling_layer=True).eval()
    # random LayerNorm affine too, so a fusion that drops scale or bias shows
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def example(batch: int = 2, seq: int = 9) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, VOCAB, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[1, 6:] = 0  # padding in the example, so no exporter can specialise on a full mask
    tti = np.zeros((batch, seq), np.int64)
    tti[:, seq // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tti}


def _export_torch(case: Case, target: Path) -> None:
    import torch

    bert = tiny_bert(case.attn)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            out = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=True,
            )
            if case.wrapper == "tuple":
                return out.last_hidden_state, out.pooler_output
            return out.last_hidden_state

    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if case.tti else [])
    outputs = ["last_hidden_state"] + (["pooler_output"] if case.wrapper == "tuple" else [])
    feeds = example()
    args = tuple(torch.from_numpy(feeds[name]) for name in names)
    with torch.no_grad():
        if case.exporter == "legacy":
            axes = {name: {0: "batch", 1: "sequence"} for name in names}
            axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
            if case.wrapper == "tuple":
                axes["pooler_output"] = {0: "batch"}
            torch.onnx.export(
                Wrapper().eval(),
                args,
                str(target),
                dynamo=False,
                input_names=names,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=case.opset,
            )
        else:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=128)
            shapes = {name: {0: batch, 1: sequence} for name in names}
            program = torch.onnx.export(
                Wrapper().eval(),
                args,
                dynamo=True,
                optimize=case.exporter == "dynamo",
                dynamic_shapes=shapes,
                input_names=names,
                output_names=outputs,
            )
            program.save(str(target))


def _export_optimum(case: Case, target: Path, folder: Path) -> None:
    from optimum.exporters.onnx import main_export

    model_dir = folder / "tiny-bert-hf"
    if not model_dir.exists():
        tiny_bert("sdpa").save_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix="optimum-export-") as out:
        main_export(
            str(model_dir),
            out,
            task="feature-extraction",
            opset=case.opset,
            local_files_only=True,
            no_post_process=True,
        )
        shutil.move(str(Path(out) / "model.onnx"), target)


def _inline(path: Path) -> None:
    import onnx

    onnx.save(onnx.load(str(path)), str(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("export-matrix")
    cache: dict[str, Path] = {}

    def get(case: Case) -> Path:
        if case.id not in cache:
            if case.exporter == "optimum":
                pytest.importorskip(
                    "optimum.exporters.onnx", reason="optimum's ONNX exporter is not installed"
                )
            if case.exporter == "dynamo-noopt" and not _dynamo_has_optimize():
                pytest.skip("this torch's dynamo exporter has no optimize= switch")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            staging = folder / case.id
            staging.mkdir()
            path = staging / "model.onnx"
            if case.exporter == "optimum":
                _export_optimum(case, path, folder)
            else:
                _export_torch(case, path)
            _inline(path)
            cache[case.id] = path
        return cache[case.id]

    return get


def optimize(model: ir.Model) -> ir.Model:
    """The default recipe's passes to a fixed point, for the cpu target without kernel timing
    (checker only: the test compares outputs itself)."""
    target = Target("cpu")
    manager = VerifiedPassManager(
        list(load_recipe("default").passes),
        Verifier([], None, Tolerance()),
        pass_factory=lambda name: create_pass(name, target),
    )
    result = manager.run(model)
    assert result.rolled_back == {}
    return result.model


def padded_feeds(names: set[str], seq: int = 11, batch: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    ids = rng.integers(5, VOCAB, (batch, seq)).astype(np.int64)
    tti = np.zeros((batch, seq), np.int64)
    tti[:, 6:] = 1
    full = np.ones((batch, seq), np.int64)
    sets = [
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": tti}
        for mask in (*padding_masks(seq, batch), full)
    ]
    return [{k: v for k, v in feed.items() if k in names} for feed in sets]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_every_fusion_hits_and_outputs_match(case: Case, exported) -> None:
    path = exported(case)
    reference = ir.load(path)
    model = optimize(ir.load(path))
    ops = [(n.domain, n.op_type) for n in model.graph]
    counts = {op: ops.count(op) for op in set(ops)}
    attention = ops.count(("com.microsoft", "Attention"))
    norms = sum(
        n for (_, op), n in counts.items() if op in ("LayerNormalization", "SkipLayerNormalization")
    )
    gelus = sum(n for (_, op), n in counts.items() if op in ("Gelu", "BiasGelu", "FastGelu"))
    left = sorted(op for _, op in ops if op in ("Softmax", "ReduceMean", "Erf"))
    assert (attention, norms, gelus, left) == (LAYERS, NORMS, LAYERS, []), (
        f"{case.id}: Attention {attention}/{LAYERS}, norms {norms}/{NORMS}, "
        f"GELU {gelus}/{LAYERS}, unfused {left}; ops {sorted(counts.items())}"
    )
    ref = runners.create_session(reference, optimization="disable_all")
    cand = runners.create_session(model, optimization="disable_all")
    names = {v.name for v in reference.graph.inputs}
    for feed in padded_feeds(names):
        expected, actual = ref.run(feed), cand.run(feed)
        for name in ref.output_names:
            error = float(np.abs(np.asarray(actual[name]) - np.asarray(expected[name])).max())
            assert error <= TOL, f"{case.id} {name}: error {error:.2e}"
