"""Latency of two models side by side: interleaved, paired, medians, with measured noise.

Machines here are shared and noisy, so a lone absolute time means little. Each round runs
A then B (order alternating between rounds) on the same inputs; the per-round ratio B/A is
the unit of evidence. The verdict uses the median ratio and the spread of the ratios
(half the inter-quartile range) as the noise: a slowdown is only claimed when it exceeds
both the noise and a minimum margin.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from pipeline.runtime import sessions as runners
from pipeline.runtime.inputs import Feeds

logger = logging.getLogger(__name__)

# Each timed sample repeats the run until it lasts at least this long, so tiny models are
# not measured at the timer's resolution.
MIN_SAMPLE_SECONDS = 0.02


@dataclass
class LatencyComparison:
    """Original (A) vs. optimized (B) latency on ONNX Runtime CPU with all optimizations on."""

    rounds: int
    runs_per_sample: int
    median_ms_original: float
    median_ms_optimized: float
    ratio: float  # median of per-round optimized/original; < 1 means faster
    noise: float  # half the inter-quartile range of the per-round ratios
    verdict: str  # faster | same | slower
    session_seconds_original: float
    session_seconds_optimized: float

    def to_dict(self) -> dict:
        return asdict(self)


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
    single = max(_time_sample(session_a, feeds, 1), _time_sample(session_b, feeds, 1), 1e-6)
    runs = max(1, min(1000, int(MIN_SAMPLE_SECONDS / single)))
    times_a, times_b = [], []
    for index in range(rounds):
        if index % 2 == 0:
            times_a.append(_time_sample(session_a, feeds, runs))
            times_b.append(_time_sample(session_b, feeds, runs))
        else:
            times_b.append(_time_sample(session_b, feeds, runs))
            times_a.append(_time_sample(session_a, feeds, runs))
    ratios = np.array(times_b) / np.array(times_a)
    ratio = float(np.median(ratios))
    q1, q3 = np.percentile(ratios, [25, 75])
    noise = float((q3 - q1) / 2)
    return LatencyComparison(
        rounds=rounds,
        runs_per_sample=runs,
        median_ms_original=float(np.median(times_a) * 1e3),
        median_ms_optimized=float(np.median(times_b) * 1e3),
        ratio=ratio,
        noise=noise,
        verdict=latency_verdict(ratio, noise, max_slowdown),
        session_seconds_original=session_a.create_seconds,
        session_seconds_optimized=session_b.create_seconds,
    )


def latency_verdict(ratio: float, noise: float, max_slowdown: float) -> str:
    """``slower`` only when the ratio exceeds 1 by more than both the margin and the noise."""
    margin = max(max_slowdown, noise)
    if ratio > 1 + margin:
        return "slower"
    if ratio < 1 - margin:
        return "faster"
    return "same"
