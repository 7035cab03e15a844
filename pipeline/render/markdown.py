"""The report as Markdown: short tables a pull-request comment can hold (``--report r.md``;
the CI job puts one per model under its gate table)."""

from __future__ import annotations

from pathlib import Path

from pipeline.summary import (
    CANDIDATE_HEADER,
    CANDIDATE_NOTE,
    PASS_HEADER,
    candidate_rows,
    model_rows,
    pass_rows,
)

_MARK = {True: "✅", False: "❌", None: "⚠️"}
STATUS_WORDS = {
    "ok": "optimized and verified",
    "verification_failed": "verification failed",
    "error": "error",
    "running": "did not finish",
}


def cell(text: object) -> str:
    """A table cell: pipes escaped, one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table(header: tuple[str, ...], rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _checks(summary: dict) -> list[str]:
    lines = [f"- {_MARK[c['passed']]} **{c['stage']}**: {c['words']}" for c in summary["checks"]]
    speed = summary["speed"]
    if speed:
        details = [speed[k] for k in ("medians", "ratio", "measured_at") if k in speed]
        lines.append(f"- **speed**: {'; '.join([speed['words'], *details])}")
    lines.append(f"- **provider**: {summary['provider']}")
    return lines + [""]


def _candidates(data: dict) -> list[str]:
    rows = candidate_rows(data)
    if not rows:
        return []
    return ["**`auto` candidates**", "", *table(CANDIDATE_HEADER, rows), CANDIDATE_NOTE, ""]


def render(data: dict, level: int = 2) -> str:
    """The Markdown report; ``level`` is its heading level (the CI job nests it)."""
    summary = data["summary"]
    heading = "#" * level
    name = Path(summary["input"]).name
    passed = data["status"] == "ok"
    lines = [
        f"{heading} {_MARK[passed]} `{name}`: {STATUS_WORDS.get(data['status'], data['status'])}"
    ]
    if data.get("message"):
        lines += ["", f"> {cell(data['message'])}"]
    rows = [list(row) for group in model_rows(summary) for row in group]
    lines += ["", *table(("", "original", "optimized"), rows)]
    lines += ["**Checks**", "", *_checks(summary)]
    lines += _candidates(data)
    applied = pass_rows(data)
    if applied:
        lines += ["**Passes that changed the model**", "", *table(PASS_HEADER, applied)]
    if data.get("warnings"):
        lines += ["**Warnings**", "", *(f"- {cell(w)}" for w in data["warnings"]), ""]
    versions = data.get("versions", {})
    lines.append(
        f"<sub>onnx-verified-optimizer {versions.get('project', '?')}, onnxruntime "
        f"{versions.get('onnxruntime', '?')}; report schema {data.get('schema_version')}</sub>"
    )
    return "\n".join(lines) + "\n"
