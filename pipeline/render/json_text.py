"""report.json's text: indented by two spaces, with lists of plain values (shapes, per-round
samples) and short flat objects (an op count row) kept on one line, so the file holds the
same content as ``json.dumps(indent=2)`` in a fraction of the lines."""

from __future__ import annotations

import json

# A flat object whose one-line form is at most this long is written on one line.
ONE_LINE = 100


def _flat(value: object) -> bool:
    return not isinstance(value, (dict, list))


def dumps(value: object, depth: int = 0) -> str:
    """``value`` as JSON text (no trailing newline)."""
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict) and value and all(map(_flat, value.values())):
        line = json.dumps(value, separators=(", ", ": "), ensure_ascii=False)
        if len(line) + len(inner) <= ONE_LINE:
            return line
    if isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(k, ensure_ascii=False)}: {dumps(v, depth + 1)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and not all(map(_flat, value)):
        items = [f"{inner}{dumps(v, depth + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def render(data: dict) -> str:
    """The report.json file content."""
    return dumps(data) + "\n"
