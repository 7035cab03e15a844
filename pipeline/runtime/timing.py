"""The one A/B timer: interleaved rounds, per-round ratios, one noise rule.

Machines here are shared and noisy, so a lone absolute time means little. Every latency
comparison in the project (the pipeline's speed check, kernel timing of a fusion, the
quantization tiers, the benchmark harness) takes its samples with ``interleaved_rounds``:
each round takes one sample from every contender, in forward order on even rounds and
reversed on odd ones (A B, B A, ...), so drift hits all alike; a sample is enough
back-to-back runs to last ``min_sample_seconds``. The per-round ratio B/A is the unit of
evidence, and ``ratio_stats`` is the one noise rule: the median ratio, with as noise the
half-width of a distribution-free 95% confidence interval of that median (order statistics
of the binomial) or, when larger, the drift between the medians of consecutive blocks of
rounds. A difference is claimed only when it exceeds the noise (and, for a verdict with a
budget, the margin: ``verdict``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import numpy as np
import onnx_ir as ir

from pipeline.runtime import machine, progress
from pipeline.runtime import sessions as runners
from pipeline.runtime.inputs import Feeds

logger = logging.getLogger(__name__)

# Each timed sample repeats the run until it lasts at least this long, so tiny models are
# not measured at the timer's resolution.
MIN_SAMPLE_SECONDS = 0.02
DRIFT_BLOCKS = 4
Sample = TypeVar("Sample")


@dataclass
class LatencyComparison:
    """Original (A) vs. optimized (B) latency on ONNX Runtime CPU with all optimizations on."""

    rounds: int
    runs_per_sample: int
    median_ms_original: float
    median_ms_optimized: float
    ratio: float  # median of per-round optimized/original; < 1 means faster
    noise: float  # ratio_stats: the median CI half-width, or the block drift when larger
    verdict: str  # faster | same | slower
    session_seconds_original: float
    session_seconds_optimized: float
    # What was measured, so a reader knows what the figures hold for: the shapes of the
    # feeds, the threads ORT was given (None: its default, one per usable core), and each
    # round's time per run (the medians above come from these).
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    intra_op_threads: int | None = None
    usable_cores: int = 0
    samples_ms_original: list[float] = field(default_factory=list)
    samples_ms_optimized: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def runs_per_sample(single_seconds: float, min_sample_seconds: float) -> int:
    """Back-to-back runs per sample so a sample lasts at least ``min_sample_seconds``."""
    if single_seconds <= 0:
        return 1000
    return max(1, min(1000, math.ceil(min_sample_seconds / single_seconds)))


def median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int, float]:
    """0-based ranks (lo, hi) of the sorted sample that bound the median with ``confidence``.

    Distribution-free: the count B of samples below the true median is Binomial(n, 1/2), and
    [x_(k), x_(n-1-k)] covers the median unless B <= k or B >= n-k, so its coverage is
    1 - 2 P(B <= k). We take the largest k whose coverage still reaches ``confidence`` and
    return the coverage actually achieved; below 6 samples 95% is out of reach and the full
    range (k = 0) is returned with its lower coverage.
    """
    if n < 1:
        raise ValueError("need at least one sample")
    alpha = 1.0 - confidence

    def tail(k: int) -> float:  # P(B <= k)
        return sum(math.comb(n, i) for i in range(k + 1)) / 2**n

    best = 0
    for k in range((n + 1) // 2):
        if 2 * tail(k) > alpha:
            break
        best = k
    coverage = 1.0 - 2 * tail(best) if n > 1 else 0.0
    return best, n - 1 - best, coverage


def block_drift(ratios_in_order: Sequence[float], blocks: int = DRIFT_BLOCKS) -> float:
    """Half the range of the median ratios of ``blocks`` consecutive runs of rounds.

    The confidence interval assumes the rounds are exchangeable. On a shared machine they
    are not: other jobs start and stop, and a ratio measured while the machine was busy can
    differ from one measured while it was quiet. Splitting the run in consecutive blocks and
    comparing their medians measures that; the reported noise takes the larger of the two,
    so a second run on a machine whose load changed still lands within it. 0 when there are
    too few rounds for blocks of three.
    """
    values = np.asarray(ratios_in_order, dtype=float)
    if values.size < 3 * blocks:
        return 0.0
    medians = [float(np.median(part)) for part in np.array_split(values, blocks)]
    return (max(medians) - min(medians)) / 2


@dataclass
class RatioStats:
    """Model vs. baseline: median per-round ratio, its 95% CI, noise, and the verdict."""

    ratio: float  # median of per-round model/baseline; < 1 means the model is faster
    ci_low: float
    ci_high: float
    confidence: float  # coverage the CI actually has
    noise: float  # max(CI half-width, drift): a difference must exceed this to be claimed
    drift: float  # half the range of the median ratios of consecutive blocks of rounds
    spread: float  # half the inter-quartile range of the per-round ratios
    rounds: int
    verdict: str  # faster | slower | same
    claim: str  # one line a human can quote

    def to_dict(self) -> dict:
        return asdict(self)


def ratio_stats(baseline_rounds: Sequence[float], model_rounds: Sequence[float]) -> RatioStats:
    """Compare per-round mean latencies of a model with the baseline's, round by round."""
    base = np.asarray(baseline_rounds, dtype=float)
    other = np.asarray(model_rounds, dtype=float)
    if base.shape != other.shape or base.size == 0:
        raise ValueError("need the same, non-zero number of rounds for both models")
    in_order = other / base
    ratios = np.sort(in_order)
    ratio = float(np.median(ratios))
    lo, hi, coverage = median_ci_ranks(ratios.size)
    ci_low, ci_high = float(ratios[lo]), float(ratios[hi])
    drift = block_drift(in_order)
    noise = max(ratio - ci_low, ci_high - ratio, drift)
    q1, q3 = np.percentile(ratios, [25, 75])
    verdict = "same"
    if abs(ratio - 1.0) > noise:
        verdict = "faster" if ratio < 1.0 else "slower"
    claim = f"{speed_words(ratio, noise, verdict)} (latency ratio {ratio:.3f} ±{noise:.3f})"
    return RatioStats(
        ratio=ratio,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=coverage,
        noise=noise,
        drift=drift,
        spread=float((q3 - q1) / 2),
        rounds=int(ratios.size),
        verdict=verdict,
        claim=claim,
    )


def agree(first: RatioStats | dict, second: RatioStats | dict) -> bool:
    """Two measurements of the same pair agree when their ratios differ by no more than the
    sum of their noises (their confidence intervals overlap)."""
    a = first.to_dict() if isinstance(first, RatioStats) else first
    b = second.to_dict() if isinstance(second, RatioStats) else second
    return abs(a["ratio"] - b["ratio"]) <= a["noise"] + b["noise"]


def interleaved_rounds(
    samplers: Sequence[Callable[[int], Sample]],
    rounds: int,
    runs: int,
    done: Callable[[list[list[Sample]]], bool] | None = None,
) -> list[list[Sample]]:
    """``rounds`` rounds; in each, ``sampler(runs)`` of every contender, forward on even
    rounds and reversed on odd ones. Returns the samples per contender, in round order.
    ``done(samples)`` may end the run early after a round (a decisive difference)."""
    samples: list[list[Sample]] = [[] for _ in samplers]
    for index in range(rounds):
        progress.advance("round", index + 1, rounds)
        order = range(len(samplers)) if index % 2 == 0 else reversed(range(len(samplers)))
        for which in order:
            samples[which].append(samplers[which](runs))
        if done is not None and done(samples):
            break
    return samples


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.1f}%" if fraction < 0.1 else f"{fraction * 100:.0f}%"


def speed_words(ratio: float, noise: float, verdict: str, margin: float = 0.0) -> str:
    """A verdict in the words people use: ``1.82x faster``, ``1.10x slower`` or ``same
    (within noise ±3.1%)``. ``ratio`` is model time / baseline time, so "faster" is its
    inverse. A ``same`` whose difference exceeds the noise but not ``margin`` (the budget a
    verdict was given) says so rather than calling the difference noise."""
    if verdict == "faster":
        return f"{1.0 / ratio:.2f}x faster"
    if verdict == "slower":
        return f"{ratio:.2f}x slower"
    if abs(ratio - 1.0) <= noise or margin <= noise:
        return f"same (within noise ±{_percent(noise)})"
    return f"same (within the ±{_percent(margin)} margin; noise ±{_percent(noise)})"


def verdict(stats: RatioStats, margin: float) -> str:
    """``slower`` / ``faster`` only when the ratio is off 1 by more than both the margin and
    the noise; else ``same``."""
    bound = max(margin, stats.noise)
    if stats.ratio > 1 + bound:
        return "slower"
    if stats.ratio < 1 - bound:
        return "faster"
    return "same"


def _time_sample(session: runners.Session, feeds: Feeds, runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        session.run(feeds)
    return (time.perf_counter() - start) / runs


def compare_latency(
    original: ir.Model,
    optimized: ir.Model,
    feeds: Feeds,
    *,
    rounds: int = 15,
    max_slowdown: float = 0.05,
    intra_op_threads: int | None = None,
    providers: list | None = None,
) -> LatencyComparison:
    """Measure both models interleaved and say whether the optimized one is slower.

    ``providers`` is an InferenceSession ``providers=`` list (names or (name, options)
    pairs, see ``pipeline.providers.Resolution.session_providers``); default CPU.
    """
    session_a = runners.create_session(
        original, optimization="all", intra_op_threads=intra_op_threads, providers=providers
    )
    session_b = runners.create_session(
        optimized, optimization="all", intra_op_threads=intra_op_threads, providers=providers
    )
    for session in (session_a, session_b):  # warm-up: allocations, first-run caches
        for _ in range(3):
            session.run(feeds)
    single = max(_time_sample(session_a, feeds, 1), _time_sample(session_b, feeds, 1))
    runs = runs_per_sample(single, MIN_SAMPLE_SECONDS)
    times_a, times_b = interleaved_rounds(
        [lambda n: _time_sample(session_a, feeds, n), lambda n: _time_sample(session_b, feeds, n)],
        rounds,
        runs,
    )
    stats = ratio_stats(times_a, times_b)
    return LatencyComparison(
        rounds=rounds,
        runs_per_sample=runs,
        median_ms_original=float(np.median(times_a) * 1e3),
        median_ms_optimized=float(np.median(times_b) * 1e3),
        ratio=stats.ratio,
        noise=stats.noise,
        verdict=verdict(stats, max_slowdown),
        session_seconds_original=session_a.create_seconds,
        session_seconds_optimized=session_b.create_seconds,
        input_shapes={name: list(np.shape(value)) for name, value in feeds.items()},
        intra_op_threads=intra_op_threads,
        usable_cores=machine.usable_cores(),
        samples_ms_original=[t * 1e3 for t in times_a],
        samples_ms_optimized=[t * 1e3 for t in times_b],
    )
