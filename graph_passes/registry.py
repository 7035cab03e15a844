"""The registry: every graph pass by the name recipes and the command line use.

Passes are found, not listed: every public module of ``graph_passes/cleanup`` and
``graph_passes/fusions`` is imported and the GraphPass subclasses it defines are registered
under their ``name``. A new pass is therefore one file; its ordering and (for a fusion) its
place in the default recipe are facts on its class (graph_passes/fusion.py). Modules whose
name starts with ``_`` hold matchers shared by several passes and define none.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from graph_passes import cleanup, fusions
from graph_passes.base import GraphPass
from graph_passes.fusion import Fusion
from graph_passes.target.targets import Target

# The recipe entry that stands for every default fusion, in their order.
FUSIONS_GROUP = "fusions"


def _discover() -> dict[str, type[GraphPass]]:
    found: dict[str, type[GraphPass]] = {}
    for package in (cleanup, fusions):
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for cls in vars(module).values():
                if (
                    inspect.isclass(cls)
                    and issubclass(cls, GraphPass)
                    and cls.__module__ == module.__name__
                    and cls.name
                ):
                    if cls.name in found:
                        raise RuntimeError(f"two passes named {cls.name!r}")
                    found[cls.name] = cls
    return dict(sorted(found.items()))


REGISTRY: dict[str, type[GraphPass]] = _discover()


def default_fusions() -> tuple[str, ...]:
    """The fusions a recipe's ``"fusions"`` entry expands to: those ``in_default``, by
    ``position``."""
    chosen = [cls for cls in REGISTRY.values() if issubclass(cls, Fusion) and cls.in_default]
    return tuple(cls.name for cls in sorted(chosen, key=lambda c: (c.position, c.name)))


def order_rules() -> tuple[tuple[str, str], ...]:
    """(earlier, later) pairs from every pass's ``runs_after``."""
    return tuple((earlier, cls.name) for cls in REGISTRY.values() for earlier in cls.runs_after)


def fusions_counting_towards(row: str) -> list[type[Fusion]]:
    """The fusions whose ``expected`` row is ``row`` (for the expected-fusion report)."""
    return [
        cls
        for cls in REGISTRY.values()
        if issubclass(cls, Fusion) and cls.expected is not None and cls.expected.row == row
    ]


def create_pass(name: str, target: Target | None = None) -> GraphPass:
    """Instantiate the pass registered under ``name`` for ``target`` (KeyError when unknown)."""
    return REGISTRY[name](target)
