"""Graph passes and the registry that names them.

``REGISTRY`` maps the name used in recipes and on the command line to the pass class. It is
written out by hand (no import-time registration) so what exists is visible in one place; a
test checks that every recipe's names resolve here.
"""

from __future__ import annotations

from graph_passes.base import GraphPass

REGISTRY: dict[str, type[GraphPass]] = {}


def create_pass(name: str) -> GraphPass:
    """Instantiate the pass registered under ``name`` (KeyError when unknown)."""
    return REGISTRY[name]()
