"""The live line under the console log: the stage, the loop it is in (``candidate int8-static
3/7 · round 5/15``) and the time it has taken, so a long stage is never silent.

It listens to ``pipeline.runtime.progress`` and disappears when the run ends (transient):
the log above it is what stays on the screen.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from pipeline.runtime import progress


class LiveProgress:
    """A context manager: a spinner line for the current stage with its inner loops."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=16),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task = None
        self._stage = ""
        self._steps: list[tuple[str, str]] = []  # (kind, "round 5/15"), outer loop first
        self._reporting = progress.reporting(self.advance)

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        self._reporting.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._reporting.__exit__(*exc)
        self._progress.stop()

    def stage(self, name: str) -> None:
        """A new stage starts: its own line, its own clock."""
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._stage, self._steps = name, []
        self._task = self._progress.add_task(name, total=None)

    def advance(self, what: str, done: int, total: int) -> None:
        """A loop moved on; a loop that restarts drops the loops nested inside it."""
        if self._task is None:
            return
        kind = what.split()[0]
        kinds = [k for k, _ in self._steps]
        if kind in kinds:
            del self._steps[kinds.index(kind) :]
        self._steps.append((kind, f"{what} {done}/{total}"))
        description = " · ".join([self._stage, *(text for _, text in self._steps)])
        self._progress.update(self._task, description=description, completed=done, total=total)
