"""The console summary: one table in the style people know from onnxslim (model info,
inputs and outputs, op counts before -> after, size), then each stage's check and the speed
in words. Rich renderables, 80 columns wide at most."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from pipeline.summary import CANDIDATE_HEADER, CANDIDATE_NOTE, candidate_rows, model_rows

_PASSED = {True: "green", False: "red", None: "yellow"}


def _model_table(summary: dict) -> Table:
    before_name = Path(summary["input"]).name
    after_name = Path(summary["output"]).name if summary["output"] else "(not written)"
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    table.add_column("")
    table.add_column(Text(before_name), overflow="fold")
    table.add_column(Text(after_name), overflow="fold")
    for index, group in enumerate(model_rows(summary)):
        if index:
            table.add_section()
        for row in group:
            table.add_row(*map(Text, row))
    return table


def _checks_table(summary: dict) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for check in summary["checks"]:
        table.add_row(Text(check["stage"], style=_PASSED[check["passed"]]), Text(check["words"]))
    speed = summary["speed"]
    if speed:
        colour = {"faster": "green", "slower": "red"}.get(speed["verdict"], "")
        words = Text(speed["words"], style=colour)
        table.add_row("speed", words)
        for key in ("medians", "ratio", "measured_at"):
            if key in speed:
                table.add_row("", Text(speed[key]))
    table.add_row("provider", Text(summary["provider"]))
    return table


def summary(data: dict) -> RenderableType:
    """The run's summary from report.json's content."""
    section = data["summary"]
    return Group(_model_table(section), _checks_table(section))


def candidates(data: dict) -> Table | None:
    """``--precision auto``'s measured candidates: what each kept, scored and cost."""
    section = data.get("quantization") or {}
    rows = candidate_rows(data)
    if not rows:
        return None
    table = Table(
        title=f"auto: candidates measured ({section.get('metric')})",
        box=box.SIMPLE_HEAD,
        header_style="bold",
        caption=CANDIDATE_NOTE,
        caption_justify="left",
    )
    for column in CANDIDATE_HEADER:
        table.add_column(column, overflow="fold", no_wrap=column in ("candidate", "time"))
    for row in rows:
        table.add_row(*map(Text, row))
    return table
