"""Small plots as inline SVG text, so the HTML report is one self-contained file that any
browser opens offline, and the same report gives the same bytes (no plotting library, no
fonts or timestamps embedded).

Four kinds, each a function returning an ``<svg>`` element: a strip plot of samples per
series (latency per round), grouped horizontal bars (op counts before/after), bars on a log
scale (errors per output) and a labelled scatter with a limit line (the quantization
front). Every plot has a ``<title>`` so a screen reader and a test can tell what it is.
"""

from __future__ import annotations

import math
from html import escape

WIDTH = 640
LEFT = 180  # room for labels
RIGHT = 24
ROW = 22
COLOURS = {"before": "#9aa5b1", "after": "#2b6cb0", "bad": "#c53030", "line": "#dd6b20"}


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 times a power of ten) covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = round(math.floor(low / step) * step, 12)
    if first > low:  # low / step underflowed to -0.0, or the rounding went past low
        first = round(first - step, 12)
    ticks = [first]
    while ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.3g}"


class _Axis:
    """Maps data values to x pixels, linear or log10."""

    def __init__(self, ticks: list[float], log: bool = False) -> None:
        self.log = log
        self.low, self.high = ticks[0], ticks[-1]
        self.ticks = ticks

    def x(self, value: float) -> float:
        if self.log:
            value = math.log10(max(value, 10**self.low))
        span = (self.high - self.low) or 1.0
        return LEFT + (WIDTH - LEFT - RIGHT) * (value - self.low) / span

    def draw(self, top: float, bottom: float, label: str) -> list[str]:
        parts = [
            f'<line x1="{LEFT}" y1="{bottom}" x2="{WIDTH - RIGHT}" y2="{bottom}" stroke="#444"/>'
        ]
        for tick in self.ticks:
            x = self.x(10**tick if self.log else tick)
            text = f"1e{int(tick)}" if self.log else _fmt(tick)
            parts.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#e2e8f0"/>'
                f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">{text}</text>'
            )
        parts.append(
            f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{bottom + 30}" '
            f'text-anchor="middle">{escape(label)}</text>'
        )
        return parts


def _svg(title: str, height: float, parts: list[str], legend: list[tuple[str, str]] = ()) -> str:
    keys = []
    for index, (name, colour) in enumerate(legend):
        x = LEFT + index * 130
        keys.append(
            f'<rect x="{x}" y="6" width="10" height="10" fill="{colour}"/>'
            f'<text x="{x + 14}" y="15">{escape(name)}</text>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" width="{WIDTH}" '
        f'height="{height:.0f}" viewBox="0 0 {WIDTH} {height:.0f}" font-family="sans-serif" '
        f'font-size="11"><title>{escape(title)}</title>' + "".join(keys + parts) + "</svg>"
    )


def _label(y: float, text: str) -> str:
    short = text if len(text) <= 30 else text[:29] + "…"
    return f'<text x="{LEFT - 6}" y="{y:.1f}" text-anchor="end">{escape(short)}</text>'


def strip_plot(title: str, series: dict[str, list[float]], unit: str) -> str:
    """One row per series: every sample a dot, the median a bar."""
    values = [v for samples in series.values() for v in samples]
    axis = _Axis(nice_ticks(min(values), max(values)))
    top = 26
    parts = []
    for index, (name, samples) in enumerate(series.items()):
        y = top + index * 2 * ROW + ROW
        colour = COLOURS["before" if index == 0 else "after"]
        parts.append(_label(y + 4, name))
        parts += [
            f'<circle cx="{axis.x(v):.1f}" cy="{y}" r="3" fill="{colour}" fill-opacity="0.6"/>'
            for v in samples
        ]
        median = sorted(samples)[len(samples) // 2] if samples else 0.0
        parts.append(
            f'<line x1="{axis.x(median):.1f}" y1="{y - 9}" x2="{axis.x(median):.1f}" '
            f'y2="{y + 9}" stroke="#000" stroke-width="2"/>'
        )
    bottom = top + len(series) * 2 * ROW
    parts += axis.draw(top, bottom, unit)
    return _svg(title, bottom + 40, parts)


def paired_bars(title: str, rows: list[tuple[str, float, float]], names: tuple[str, str]) -> str:
    """Two bars per label (before, after), linear scale from 0."""
    axis = _Axis(nice_ticks(0, max([max(a, b) for _, a, b in rows] + [1])))
    top = 26
    parts = []
    for index, (label, before, after) in enumerate(rows):
        y = top + index * ROW
        parts.append(_label(y + 14, label))
        for offset, value, key in ((3, before, "before"), (11, after, "after")):
            width = axis.x(value) - LEFT
            parts.append(
                f'<rect x="{LEFT}" y="{y + offset}" width="{width:.1f}" height="7" '
                f'fill="{COLOURS[key]}"><title>{escape(label)}: {_fmt(value)}</title></rect>'
            )
    bottom = top + len(rows) * ROW + 4
    parts += axis.draw(top, bottom, "count")
    legend = [(names[0], COLOURS["before"]), (names[1], COLOURS["after"])]
    return _svg(title, bottom + 40, parts, legend)


def log_bars(title: str, rows: list[tuple[str, float, bool]], unit: str) -> str:
    """One bar per label on a log10 scale; a zero is written, not drawn; ``bad`` in red."""
    positive = [v for _, v, _ in rows if v > 0]
    low = math.floor(math.log10(min(positive))) if positive else -8
    high = math.ceil(math.log10(max(positive))) if positive else 0
    axis = _Axis(list(range(low, max(high, low + 1) + 1)), log=True)
    top = 26
    parts = []
    for index, (label, value, bad) in enumerate(rows):
        y = top + index * ROW
        parts.append(_label(y + 14, label))
        if value > 0:
            width = axis.x(value) - LEFT
            colour = COLOURS["bad" if bad else "after"]
            parts.append(
                f'<rect x="{LEFT}" y="{y + 5}" width="{max(width, 1):.1f}" height="12" '
                f'fill="{colour}"><title>{escape(label)}: {value:.3g}</title></rect>'
            )
        else:
            parts.append(f'<text x="{LEFT + 4}" y="{y + 15}">0 (identical)</text>')
    bottom = top + len(rows) * ROW + 4
    parts += axis.draw(top, bottom, unit)
    return _svg(title, bottom + 40, parts)


def scatter(
    title: str,
    points: list[tuple[str, float, float, bool]],
    x_label: str,
    y_label: str,
    limit: float | None = None,
) -> str:
    """Labelled points (label, x, y, highlighted); ``limit``: a horizontal line at that y."""
    xs = [x for _, x, _, _ in points]
    ys = [y for _, _, y, _ in points] + ([limit] if limit is not None else [])
    axis = _Axis(nice_ticks(min(xs + [1.0]), max(xs + [1.0])))
    y_ticks = nice_ticks(0, max(ys + [1e-6]))
    top, height = 26, 220
    bottom = top + height

    def y_of(value: float) -> float:
        return bottom - height * (value - y_ticks[0]) / ((y_ticks[-1] - y_ticks[0]) or 1.0)

    parts = [
        f'<line x1="{LEFT}" y1="{y_of(t):.1f}" x2="{WIDTH - RIGHT}" y2="{y_of(t):.1f}" '
        f'stroke="#e2e8f0"/><text x="{LEFT - 6}" y="{y_of(t) + 4:.1f}" '
        f'text-anchor="end">{_fmt(t)}</text>'
        for t in y_ticks
    ]
    parts.append(
        f'<text x="16" y="{(top + bottom) / 2}" transform="rotate(-90 16 {(top + bottom) / 2})" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    if limit is not None:
        parts.append(
            f'<line x1="{LEFT}" y1="{y_of(limit):.1f}" x2="{WIDTH - RIGHT}" '
            f'y2="{y_of(limit):.1f}" stroke="{COLOURS["line"]}" stroke-dasharray="6 3"/>'
            f'<text x="{WIDTH - RIGHT}" y="{y_of(limit) - 4:.1f}" text-anchor="end" '
            f'fill="{COLOURS["line"]}">budget</text>'
        )
    for label, x, y, chosen in points:
        colour = COLOURS["bad" if chosen else "after"]
        radius = 6 if chosen else 4
        at = axis.x(x)
        side = "end" if at > (LEFT + WIDTH) / 2 else "start"  # labels stay inside the plot
        parts.append(
            f'<circle cx="{at:.1f}" cy="{y_of(y):.1f}" r="{radius}" fill="{colour}"/>'
            f'<text x="{at + (-8 if side == "end" else 8):.1f}" y="{y_of(y) - 6:.1f}" '
            f'text-anchor="{side}">{escape(label)}</text>'
        )
    parts += axis.draw(top, bottom, x_label)
    return _svg(title, bottom + 40, parts)
