"""Progress of the long loops (timing rounds, quantization candidates), for whoever shows it.

The loops sit deep below the command line (``timing.interleaved_rounds`` is used by the
speed check, every ``auto`` candidate and the benchmark), so passing a callback down every
call would touch every signature on the way. Instead a loop calls ``advance`` and the one
display the command line installed with ``reporting`` hears it; with none installed (tests,
the CI job, library use) ``advance`` does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Callback = Callable[[str, int, int], None]  # (what, done, total)

_listeners: list[Callback] = []


@contextlib.contextmanager
def reporting(callback: Callback) -> Iterator[None]:
    """Send ``advance`` calls made inside the block to ``callback``."""
    _listeners.append(callback)
    try:
        yield
    finally:
        _listeners.remove(callback)


def advance(what: str, done: int, total: int) -> None:
    """``done`` of ``total`` steps of ``what`` are under way or finished."""
    for callback in _listeners:
        callback(what, done, total)
