"""The benchmark harness: its statistics on synthetic timings, its inputs, and its CLI.

The statistics are pure functions, so they are checked on timings whose true ratio is known:
a real difference must be claimed, no difference must not be, and two independent runs of
the same pair must agree within the noise the harness reports (the issue's acceptance rule,
here checked over many synthetic repeats rather than one lucky pair).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from pipeline.bench import harness as B
from pipeline.runtime import timing
from tests import test_cli as cli_tests

ROOT = Path(__file__).resolve().parents[1]

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 16] x) => (float[batch, 16] y) {
  w = Constant<value = float[16, 16] {WEIGHTS}>()
  m = MatMul(x, w)
  y = Relu(m)
}
""".replace("WEIGHTS", ", ".join(["0.25"] * 256))

TOKENS = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[batch, sequence] input_ids, int64[batch, sequence] attention_mask)
    => (float[batch, sequence, 4] y) {
  table = Constant<value = float[30, 4] {TABLE}>()
  e = Gather(table, input_ids)
  f = Cast<to = 1>(attention_mask)
  axes = Constant<value = int64[1] {2}>()
  g2 = Unsqueeze(f, axes)
  y = Mul(e, g2)
}
"""


def synthetic_rounds(
    rng: np.random.Generator, rounds: int, true_ratio: float, jitter: float, drift: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-round mean latencies of a baseline and a model on a drifting, noisy machine.

    The machine's speed drifts across rounds (shared by both, as interleaving intends) and
    each sample has its own multiplicative noise.
    """
    machine = 1.0 + drift * np.sin(np.linspace(0, 3, rounds)) + rng.uniform(0, drift, rounds)
    base = 0.010 * machine * rng.lognormal(0, jitter, rounds)
    model = 0.010 * true_ratio * machine * rng.lognormal(0, jitter, rounds)
    return base, model


# ----------------------------------------------------------------------- statistics


def test_latency_summary_percentiles_and_throughput() -> None:
    times = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    s = B.latency_summary(times, batch=8)
    assert s["runs"] == 100
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["min_ms"] == pytest.approx(1.0)
    assert s["throughput_per_s"] == pytest.approx(8 / 0.0505)
    with pytest.raises(ValueError):
        B.latency_summary([], 1)


@pytest.mark.parametrize(
    ("n", "lo", "hi"),
    [(5, 0, 4), (6, 0, 5), (10, 1, 8), (20, 5, 14), (30, 9, 20)],
)
def test_median_ci_ranks_match_the_binomial_table(n: int, lo: int, hi: int) -> None:
    got_lo, got_hi, coverage = timing.median_ci_ranks(n)
    assert (got_lo, got_hi) == (lo, hi)
    if n >= 6:
        assert coverage >= 0.95
        # one rank narrower would miss 95%
        tail = sum(__import__("math").comb(n, i) for i in range(lo + 2)) / 2**n
        assert 1 - 2 * tail < 0.95
    else:
        assert coverage == pytest.approx(1 - 2 / 2**n)


def test_median_ci_covers_the_true_median_at_least_95_percent() -> None:
    rng = np.random.default_rng(0)
    lo, hi, _ = timing.median_ci_ranks(20)
    hits = 0
    for _ in range(2000):
        sample = np.sort(rng.lognormal(0, 0.2, 20))
        hits += sample[lo] <= 1.0 <= sample[hi]  # lognormal(0, s) has median 1
    assert hits / 2000 >= 0.94


def test_real_speedup_is_claimed() -> None:
    base, model = synthetic_rounds(np.random.default_rng(1), 20, 0.7, 0.03, 0.2)
    stats = timing.ratio_stats(base, model)
    assert stats.verdict == "faster"
    assert stats.ci_low <= 0.7 <= stats.ci_high
    assert abs(stats.ratio - 1) > stats.noise
    assert stats.claim.startswith("1.4") and "faster" in stats.claim


def test_real_slowdown_is_claimed() -> None:
    base, model = synthetic_rounds(np.random.default_rng(2), 20, 1.3, 0.03, 0.2)
    stats = timing.ratio_stats(base, model)
    assert stats.verdict == "slower" and "slower" in stats.claim


def test_difference_inside_the_noise_is_not_claimed() -> None:
    # A 3% difference measured with 20% per-sample jitter is not evidence of anything.
    base, model = synthetic_rounds(np.random.default_rng(3), 20, 0.97, 0.2, 0.2)
    stats = timing.ratio_stats(base, model)
    assert stats.verdict == "same", stats
    assert stats.noise > 0.03
    assert stats.claim.startswith("same (within noise ±")


def test_machine_drift_cancels_out_of_paired_ratios() -> None:
    # The machine gets 3x slower over the run, but the ratio is still found: rounds pair A/B.
    base, model = synthetic_rounds(np.random.default_rng(4), 20, 0.9, 0.01, 2.0)
    stats = timing.ratio_stats(base, model)
    assert stats.verdict == "faster" and stats.ratio == pytest.approx(0.9, abs=0.02)


def test_ratio_stats_rejects_mismatched_rounds() -> None:
    with pytest.raises(ValueError):
        timing.ratio_stats([1.0, 2.0], [1.0])


def test_two_runs_of_the_same_pair_agree_within_their_noise() -> None:
    """The acceptance rule on synthetic timings: independent runs agree (95%+ of the time);
    runs of a different pair do not."""
    rng = np.random.default_rng(5)
    trials = 400
    agreed = sum(
        timing.agree(
            timing.ratio_stats(*synthetic_rounds(rng, 20, 0.8, 0.1, 0.3)),
            timing.ratio_stats(*synthetic_rounds(rng, 20, 0.8, 0.1, 0.3)),
        )
        for _ in range(trials)
    )
    assert agreed / trials >= 0.95
    fast = timing.ratio_stats(*synthetic_rounds(rng, 20, 0.6, 0.02, 0.3))
    slow = timing.ratio_stats(*synthetic_rounds(rng, 20, 1.0, 0.02, 0.3))
    assert not timing.agree(fast, slow)
    assert timing.agree(fast.to_dict(), fast)


def test_runs_per_sample() -> None:
    assert timing.runs_per_sample(0.001, 0.02) == 20
    assert timing.runs_per_sample(0.5, 0.02) == 1
    assert timing.runs_per_sample(1e-7, 0.02) == 1000
    assert timing.runs_per_sample(0.0, 0.02) == 1000


# ----------------------------------------------------------------------- inputs


def test_bench_feeds_set_the_batch_dim_and_keep_values_valid() -> None:
    text = TOKENS.replace("TABLE", ", ".join(["0.5"] * 120))
    model = ir.from_proto(onnx.parser.parse_model(text))
    feeds, has_batch = B.bench_feeds(model, 8)
    assert has_batch
    assert feeds["input_ids"].shape == (8, B.DEFAULT_SEQUENCE)
    assert feeds["input_ids"].max() < 30  # inside the Gather table
    assert set(np.unique(feeds["attention_mask"])) <= {0, 1}
    feeds, _ = B.bench_feeds(model, 2, {"sequence": 5})
    assert feeds["attention_mask"].shape == (2, 5)


def test_bench_feeds_static_batch() -> None:
    model = ir.from_proto(onnx.parser.parse_model(MODEL.replace("batch", "1")))
    feeds, has_batch = B.bench_feeds(model, 8)
    assert not has_batch and feeds["x"].shape == (1, 16)


# ----------------------------------------------------------------------- CLI end to end


def run_cli(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return cli_tests.run_cli(*args, timeout=timeout, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(onnx.parser.parse_model(MODEL), a)
    onnx.save(
        onnx.parser.parse_model(MODEL.replace("y = Relu(m)", "r = Relu(m)\n  y = Relu(r)")), b
    )
    return a, b


def test_bench_cli_writes_json_with_every_figure(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench", *pair, "--batch-sizes", "1,4", "--rounds", "4", "--warmup", "2",
        "--min-sample-ms", "2", "--intra-op-threads", "1", "--placement", "--json", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["schema_version"] == "1.0" and result["kind"] == "benchmark"
    assert [m["label"] for m in result["models"]] == ["a", "b"]
    for model in result["models"]:
        assert model["size_bytes"] > 1000 and model["session_seconds"] > 0
        assert model["peak_rss_bytes"] > model["rss_baseline_bytes"] > 0
        assert model["gpu_memory_bytes"] is None  # CPU provider
        assert model["session_providers"] == ["CPUExecutionProvider"]
    placement = result["models"][1]["placement"]["by_provider"]["CPUExecutionProvider"]
    assert placement["op_types"] == {"MatMul": 1, "Relu": 2}  # b has the extra Relu
    assert [b["batch"] for b in result["batches"]] == [1, 4]
    batch4 = result["batches"][1]
    assert batch4["inputs"]["x"]["shape"] == [4, 16]
    assert len(batch4["round_means_ms"]["a"]) == 4
    lat = batch4["latency"]["b"]
    assert lat["runs"] == 4 * batch4["runs_per_sample"]
    assert lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    comp = batch4["comparisons"][0]
    assert comp["model"] == "b" and comp["baseline"] == "a" and comp["rounds"] == 4
    assert comp["verdict"] in ("faster", "slower", "same")
    assert result["threads"]["intra_op_threads"] == 1
    assert result["threads"]["env"]["OMP_NUM_THREADS"] == "1"
    assert result["provider"]["resolved"] == "cpu"
    assert "p50 ms" in proc.stderr  # the rich table
    # each table says what it measured, sizes in decimal units, the verdict in words
    assert "batch4: x[4,16]; 1 threads;" in proc.stderr
    assert "1 MB = 10^6 bytes" in proc.stderr and " kB " in proc.stderr
    assert re.search(r"\d\.\d\dx (faster|slower)|same \(within noise ±", proc.stderr)


def test_bench_cli_bad_input_exits_2(pair: tuple[Path, Path], tmp_path: Path) -> None:
    proc = run_cli("bench", tmp_path / "missing.onnx")
    assert proc.returncode == 2 and "model not found" in proc.stderr
    proc = run_cli("bench", pair[0], "--batch-sizes", "0,2")
    assert proc.returncode == 2 and "--batch-sizes" in proc.stderr
    proc = run_cli("bench", pair[0], "--rounds", "2")
    assert proc.returncode == 2 and "--rounds" in proc.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may make CUDA work")
def test_bench_cli_refuses_a_provider_that_does_not_work(pair: tuple[Path, Path]) -> None:
    proc = run_cli("bench", pair[0], "--provider", "cuda")
    assert proc.returncode == 2 and "--provider cuda cannot run here" in proc.stderr


def test_optimize_still_takes_a_model_first(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    proc = run_cli(pair[0], "-o", out, "--no-speed-check")
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    assert run_cli("bench", "--help").returncode == 0


@pytest.mark.cuda
def test_bench_on_cuda_records_gpu_memory_and_placement(pair: tuple[Path, Path]) -> None:
    from pipeline.providers import probe

    if not probe("cuda").ok:
        pytest.skip(f"CUDA provider does not work here: {probe('cuda').reason}")
    config = B.BenchConfig(models=list(pair), rounds=4, warmup=2, min_sample_seconds=0.002)
    config.provider = B.providers_mod.ProviderRequest("cuda", options={"io_binding": "True"})
    result = B.run_bench(config)
    assert result["provider"]["resolved"] == "cuda"
    for model in result["models"]:
        assert model["gpu_memory_bytes"] is not None and model["gpu_memory_bytes"] > 0
        assert "CUDAExecutionProvider" in model["placement"]["by_provider"]
