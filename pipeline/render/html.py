"""The report as one self-contained HTML file (``--report r.html``): the summary, plots as
inline SVG (latency per round original vs optimized, op counts before/after, error per
output, the quantization front when ``auto`` measured one), the detail tables, and the
whole report.json folded at the end. No script, no external file: it opens offline and
can be attached to a ticket as it is."""

from __future__ import annotations

from html import escape
from pathlib import Path

from pipeline import summary as facts
from pipeline.render import json_text, svg
from pipeline.render.markdown import STATUS_WORDS

# Op rows drawn in the histogram; the rest are summed into one row.
MAX_OP_ROWS = 30

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 960px; color: #1a202c; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #e2e8f0; padding: 3px 10px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #276749; } .bad { color: #c53030; } .warn { color: #b7791f; }
.badge { padding: 2px 8px; border-radius: 4px; color: #fff; }
.badge.ok { background: #276749; } .badge.bad { background: #c53030; }
figure { margin: 1em 0; } figcaption { color: #4a5568; font-size: 0.9em; }
pre { background: #f7fafc; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


def _table(header: tuple[str, ...], rows: list, numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{escape(str(v))}</td>' if i in numeric else f"<td>{escape(str(v))}</td>"
            for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(plot: str, caption: str) -> str:
    return f"<figure>{plot}<figcaption>{escape(caption)}</figcaption></figure>"


def _checks(summary: dict) -> str:
    items = []
    for check in summary["checks"]:
        css = {True: "ok", False: "bad", None: "warn"}[check["passed"]]
        items.append(
            f'<li><b class="{css}">{escape(check["stage"])}</b>: {escape(check["words"])}</li>'
        )
    speed = summary["speed"]
    if speed:
        css = {"faster": "ok", "slower": "bad"}.get(speed["verdict"], "")
        detail = "; ".join(speed[k] for k in ("medians", "ratio", "measured_at") if k in speed)
        items.append(
            f'<li><b>speed</b>: <span class="{css}">{escape(speed["words"])}</span>'
            + (f" ({escape(detail)})" if detail else "")
            + "</li>"
        )
    items.append(f"<li><b>provider</b>: {escape(summary['provider'])}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def latency_plot(data: dict) -> str | None:
    latency = data.get("latency") or {}
    original, optimized = latency.get("samples_ms_original"), latency.get("samples_ms_optimized")
    if not original or not optimized:
        return None
    plot = svg.strip_plot(
        "Latency per round, original vs optimized",
        {"original": original, "optimized": optimized},
        "ms per run (one dot per round; bar: median)",
    )
    speed = data["summary"]["speed"] or {}
    return _figure(plot, f"{speed.get('words', '')}; {speed.get('measured_at', '')}")


def op_plot(data: dict) -> str | None:
    before = data["input_model"]["op_histogram"]
    after = (data.get("output_model") or {}).get("op_histogram")
    if after is None:
        return None
    ops = sorted(
        set(before) | set(after), key=lambda op: (-max(before.get(op, 0), after.get(op, 0)), op)
    )
    rows = [(op, before.get(op, 0), after.get(op, 0)) for op in ops[:MAX_OP_ROWS]]
    rest = ops[MAX_OP_ROWS:]
    if rest:
        rows.append(
            (
                f"{len(rest)} other ops",
                sum(before.get(op, 0) for op in rest),
                sum(after.get(op, 0) for op in rest),
            )
        )
    plot = svg.paired_bars("Op counts before and after", rows, ("original", "optimized"))
    return _figure(plot, "Nodes per op type (all graphs, subgraphs included).")


def error_plot(data: dict) -> str | None:
    outputs = (data.get("parity") or {}).get("outputs") or []
    rows = [
        (o["name"], float(o.get("max_abs_error") or 0.0), o.get("verdict") != "pass")
        for o in outputs
        if isinstance(o.get("max_abs_error"), (int, float))
    ]
    if not rows:
        return None
    plot = svg.log_bars("Max absolute error per output", rows, "max abs error (log scale)")
    return _figure(plot, "Graph passes (fp32) vs the original, worst input set; red: failed.")


def front_plot(data: dict) -> str | None:
    """Speed against accuracy for every ``auto`` candidate; the drop is drawn as a share of
    the candidate's own budget (tiers have different budgets), so one line marks them all."""
    section = data.get("quantization") or {}
    points = [
        (
            row["precision"],
            row["latency_ratio"],
            (row.get("drop") or 0.0) / row["max_drop"] if row.get("max_drop") else 0.0,
            bool(row.get("chosen")),
        )
        for row in section.get("candidates") or []
        if isinstance(row.get("latency_ratio"), (int, float))
    ]
    if len(points) < 2:
        return None
    plot = svg.scatter(
        "Quantization front: speed vs accuracy drop",
        points,
        "time vs fp32 (< 1 is faster)",
        f"{section.get('metric')} drop / budget",
        1.0,
    )
    return _figure(plot, "Each tier auto built; red: chosen; dashed: the accuracy budget.")


def _details(data: dict) -> str:
    parts = []
    passes = facts.pass_rows(data)
    if passes:
        table = _table(facts.PASS_HEADER, passes, {3, 4})
        parts.append("<h2>Passes that changed the model</h2>" + table)
    idle = data.get("passes_unchanged") or []
    if idle:
        names = ", ".join(row["name"] for row in idle)
        parts.append(f"<p>Passes that found nothing to change: {escape(names)}.</p>")
    candidates = facts.candidate_rows(data)
    if candidates:
        parts.append(
            "<h2><code>auto</code> candidates</h2>"
            + _table(facts.CANDIDATE_HEADER, candidates, {1})
            + f"<p>{escape(facts.CANDIDATE_NOTE)}</p>"
        )
    fusions = [
        [f["fusion"], f["expected"], f["achieved"], f.get("note", "")]
        for f in data.get("fusions", [])
    ]
    if fusions:
        header = ("fusion", "expected", "achieved", "note")
        parts.append("<h2>Fusions</h2>" + _table(header, fusions, {1, 2}))
    if data.get("warnings"):
        items = "".join(f"<li>{escape(w)}</li>" for w in data["warnings"])
        parts.append(f"<h2>Warnings</h2><ul>{items}</ul>")
    return "".join(parts)


def render(data: dict) -> str:
    """The HTML report from report.json's content."""
    summary = data["summary"]
    name = Path(summary["input"]).name
    ok = data["status"] == "ok"
    status = STATUS_WORDS.get(data["status"], data["status"])
    head = (
        f'<h1>{escape(name)} <span class="badge {"ok" if ok else "bad"}">{escape(status)}</span>'
        "</h1>"
    )
    if data.get("message"):
        head += f'<p class="bad">{escape(data["message"])}</p>'
    rows = [list(row) for group in facts.model_rows(summary) for row in group]
    plots = [
        p for p in (latency_plot(data), op_plot(data), error_plot(data), front_plot(data)) if p
    ]
    body = (
        head
        + "<h2>Summary</h2>"
        + _table(["", "original", "optimized"], rows, {1, 2})
        + _checks(summary)
        + ("<h2>Plots</h2>" + "".join(plots) if plots else "")
        + _details(data)
        + "<h2>report.json</h2><details><summary>show</summary><pre>"
        + escape(json_text.dumps(data))
        + "</pre></details>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(name)}: {escape(status)}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )
