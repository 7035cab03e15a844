"""Replace one generated section of a Markdown document, between two HTML-comment markers.

Benchmark scripts each own a section of ``docs/benchmarks.md`` and regenerate it with
``--write``; the text around the markers is written by people and must survive. A section
that is not there yet is appended under its heading.
"""

from __future__ import annotations

from pathlib import Path


def markers(key: str) -> tuple[str, str]:
    """The begin/end markers of the section named ``key``."""
    return f"<!-- {key}:begin -->", f"<!-- {key}:end -->"


def replace_section(text: str, key: str, body: str, heading: str) -> str:
    """``text`` with the ``key`` section's body replaced (or appended under ``heading``).

    Raises:
        ValueError: the begin marker is present without an end marker after it (replacing
            would silently eat the rest of the document).
    """
    begin, end = markers(key)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin not in text:
        return text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    head, rest = text.split(begin, 1)
    if end not in rest:
        raise ValueError(f"'{begin}' has no matching '{end}'")
    return head + block + rest.split(end, 1)[1]


def write_section(doc: Path, key: str, body: str, heading: str) -> None:
    """Rewrite ``doc`` with the section replaced; a missing document is created."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    doc.write_text(replace_section(text, key, body, heading))
