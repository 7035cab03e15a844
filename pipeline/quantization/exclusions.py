"""Which quantized nodes stay in float: ranked by their measured effect, fewest within budget.

A node's sensitivity is what quantizing it does to the metric the user chose, measured: a
model with ONLY that node lowered (every other node kept float) is built with the tier's own
tool and scored against fp32 on the decision data. A proxy (the SQNR of each node's inputs or
output) ranks nodes by how much noise they see, not by how much of it reaches the metric: on
MiniLM it made the guard keep 14 MatMuls in fp32 where 4 measured ones were enough. Measuring
costs one build and one scoring per node, so above ``MAX_MEASURED`` nodes the SQNR proxy only
picks which nodes are worth measuring (the report says so).

With the ranking, the fewest exclusions within budget are searched, not stepped through: the
count of worst nodes kept float doubles (1, 2, 4, ...) until the budget holds, then a bisection
between the last count that missed and the first that held finds the smallest. Every count
measured is returned (``Point``): with the latency of the result, they are the accuracy side of
the front ``auto`` reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MAX_MEASURED = 32


@dataclass(frozen=True)
class Point:
    """One measured candidate: ``kept_float`` worst nodes in float, and its score."""

    kept_float: int
    score: object  # metrics.Score or lm_guard.LmAccuracy
    path: object  # where the candidate model was written

    def to_dict(self, budget: float) -> dict:
        return {
            "kept_float": self.kept_float,
            "drop": self.score.drop,
            "within_budget": self.score.within(budget),
            "summary": self.score.summary(budget),
        }


def measured_ranking(
    nodes: Sequence[str],
    score_only: Callable[[str], float],
    proxy: Callable[[], list[tuple[str, float]]] | None = None,
) -> tuple[list[tuple[str, float]], str]:
    """(node, metric drop with only that node quantized), worst first, and a note.

    ``score_only(node)`` builds and scores the model with just ``node`` lowered and returns
    its drop. Above ``MAX_MEASURED`` nodes, ``proxy()`` (node, SQNR dB; lowest first) chooses
    the ``MAX_MEASURED`` to measure; the rest follow in proxy order, unmeasured (drop None).
    """
    chosen, rest = list(nodes), []
    note = f"measured the metric with each of the {len(chosen)} quantized node(s) alone"
    if len(chosen) > MAX_MEASURED and proxy is not None:
        ordered = [name for name, _ in proxy()]
        chosen, rest = ordered[:MAX_MEASURED], ordered[MAX_MEASURED:]
        note = (
            f"measured the metric with each of the {MAX_MEASURED} node(s) of lowest SQNR alone "
            f"(of {len(nodes)} quantized; measuring all would cost {len(nodes)} builds)"
        )
    measured = []
    for name in chosen:
        drop = score_only(name)
        logger.info("sensitivity: %s alone -> drop %.5f", name, drop)
        measured.append((name, drop))
    measured.sort(key=lambda item: -item[1])
    return measured + [(name, None) for name in rest], note


def fewest_within(
    limit: int, measure: Callable[[int], Point], budget: float, full: Point
) -> tuple[Point, list[Point]]:
    """The smallest count of worst nodes kept float whose candidate is within ``budget``
    (at most ``limit``), and every point measured on the way (``full`` is count 0).

    Doubling then bisection assumes more float nodes never hurt accuracy, which holds up to
    measurement noise; the returned point is always one that was measured within budget, or
    the last one tried (``limit``) when none was.
    """
    points = {0: full}
    passed_at, failed_at, count = None, 0, 1
    while count <= limit:
        points[count] = measure(count)
        if points[count].score.within(budget):
            passed_at = count
            break
        failed_at = count
        if count == limit:
            break
        count = min(count * 2, limit)
    if passed_at is None:
        return points[max(points)], [points[k] for k in sorted(points)]
    while passed_at - failed_at > 1:
        middle = (passed_at + failed_at) // 2
        points[middle] = measure(middle)
        if points[middle].score.within(budget):
            passed_at = middle
        else:
            failed_at = middle
    return points[passed_at], [points[k] for k in sorted(points)]
