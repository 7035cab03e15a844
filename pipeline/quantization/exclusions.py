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
        return {"kept_float": self.kept_float, **budget_row(self.score, budget)}


def budget_row(score, budget: float) -> dict:
    """A measured candidate's score against ``budget``, as the report lists it (the guard's
    path here, the pruning search)."""
    return {
        "drop": score.drop,
        "within_budget": score.within(budget),
        "summary": score.summary(budget),
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


def first_flip(limit: int, flipped: Callable[[int], bool]) -> int | None:
    """The smallest level in 1..``limit`` where ``flipped(level)`` is True, for a ``flipped``
    that is False up to some level and True from there on; None when ``limit`` is still False.

    The level doubles (1, 2, 4, ... ``limit``) until it flips, then bisects between the last
    False and the first True; no level is probed twice. The guard here and the pruning search
    (``pipeline.pruning.stage``) both search this way.
    """
    last_false, level = 0, 1
    while not flipped(level):
        last_false = level
        if level == limit:
            return None
        level = min(level * 2, limit)
    first_true = level
    while first_true - last_false > 1:
        middle = (first_true + last_false) // 2
        if flipped(middle):
            first_true = middle
        else:
            last_false = middle
    return first_true


def fewest_within(
    limit: int, measure: Callable[[int], Point], budget: float, full: Point
) -> tuple[Point, list[Point]]:
    """The smallest count of worst nodes kept float whose candidate is within ``budget``
    (at most ``limit``), and every point measured on the way (``full`` is count 0).

    Doubling then bisection (``first_flip``) assumes more float nodes never hurt accuracy,
    which holds up to measurement noise; the returned point is always one that was measured
    within budget, or the last one tried (``limit``) when none was.
    """
    points = {0: full}

    def within(count: int) -> bool:
        points[count] = measure(count)
        return points[count].score.within(budget)

    count = first_flip(limit, within)
    chosen = points[max(points)] if count is None else points[count]
    return chosen, [points[k] for k in sorted(points)]
