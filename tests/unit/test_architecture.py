"""The layout rules of docs/architecture.md, checked so that they cannot quietly rot.

Each rule here was broken once (issue 12): modules importing each other in a circle, a graph
pass reaching up into the pipeline that runs it, eleven places opening an ORT session, scripts
and tests loading code by file path, a README pointing at a document outside the repository.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "graph_passes", "models")


@cache
def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _edges() -> list[tuple[str, str]]:
    graph = _graph()
    return [
        (module, imported)
        for module in sorted(graph.modules)
        for imported in graph.find_modules_directly_imported_by(module)
    ]


def _is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").exists()


def test_no_file_level_import_cycle():
    """An edge a -> b closes a cycle when b already reaches a. Package ``__init__`` files are
    left out: a package importing its own members is not a cycle between files."""
    graph = _graph()
    cycles = []
    for importer, imported in _edges():
        if _is_package(importer) or _is_package(imported):
            continue
        if importer in graph.find_upstream_modules(imported):
            cycles.append(f"{importer} -> {imported}")
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_graph_passes_never_import_back_through_pipeline():
    """graph_passes sits on pipeline.runtime only; a pipeline module it imports must not lead
    back into graph_passes (that is how the recipe, the registry and the passes got tangled)."""
    graph = _graph()
    bad = [
        f"{importer} -> {imported}"
        for importer, imported in _edges()
        if importer.startswith("graph_passes")
        and imported.startswith("pipeline")
        and any(m.startswith("graph_passes") for m in graph.find_upstream_modules(imported))
    ]
    assert not bad, "graph_passes reaches back through pipeline:\n" + "\n".join(bad)


def test_runtime_imports_nothing_above_it():
    bad = [
        f"{importer} -> {imported}"
        for importer, imported in _edges()
        if importer.startswith("pipeline.runtime")
        and not imported.startswith("pipeline.runtime")
        and imported.split(".")[0] in PACKAGES
    ]
    assert not bad, "pipeline.runtime must import nothing above it:\n" + "\n".join(bad)


def test_a_pass_never_imports_another_pass():
    """Passes share matcher helpers through graph_passes.match, not by importing each other."""
    pass_dirs = ("graph_passes.cleanup.", "graph_passes.fusions.")
    bad = [
        f"{importer} -> {imported}"
        for importer, imported in _edges()
        if importer.startswith(pass_dirs)
        and imported.startswith(pass_dirs)
        and not imported.rsplit(".", 1)[1].startswith("_")
    ]
    assert not bad, "passes import passes:\n" + "\n".join(bad)


def _python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_at_most_two_session_constructions_outside_tests():
    sites = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in _python_files(*PACKAGES, "scripts")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "InferenceSession(" in line
    ]
    assert len(sites) <= 2, "ORT sessions are built in one factory; found:\n" + "\n".join(sites)


_LOADS_BY_PATH = {
    "sys.path edit": re.compile(
        r"sys\.path\.(insert|append|extend|remove|pop)\(|sys\.path\s*(\+)?="
    ),
    "spec_from_file_location": re.compile(r"spec_from_file_location"),
}


# The one place a file is loaded as a module: the USER's scorer, ``--metric FILE.py:FUNCTION``.
_USER_CODE_LOADERS = {"pipeline/quantization/metrics.py"}


@pytest.mark.parametrize("what", sorted(_LOADS_BY_PATH))
def test_no_code_loaded_by_path(what):
    """Scripts and tests import the installed package; none edits sys.path or loads a file
    as a module (reading sys.path, e.g. to find libraries, is fine), except to load a user's
    plug-in named on the command line."""
    this = Path(__file__).resolve()
    hits = [
        str(path.relative_to(ROOT))
        for path in _python_files(*PACKAGES, "scripts", "tests")
        if path != this
        and str(path.relative_to(ROOT)) not in _USER_CODE_LOADERS
        and _LOADS_BY_PATH[what].search(path.read_text())
    ]
    assert not hits, f"{what} in: {hits}"


_LINK = re.compile(r"\]\(([^)#]+)(?:#[^)]*)?\)")  # [text](target#anchor)
_QUOTED_DOC = re.compile(r"`([^`\s]+\.md)`")  # `some/doc.md`, named but not linked


def test_documents_link_only_inside_the_repository():
    outside = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = doc.read_text()
        for target in _LINK.findall(text) + _QUOTED_DOC.findall(text):
            if re.match(r"[a-z]+://", target):
                continue  # a web address is not a file of this clone
            resolved = (doc.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                outside.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not outside, "links that a clone cannot follow:\n" + "\n".join(outside)


def test_the_zoo_wins_over_onnxruntime_transformers_own_models_package(tmp_path):
    """onnxruntime.transformers appends its folder, which holds a ``models`` package, to
    sys.path; a script run from anywhere must still get this project's ``models`` (with a
    strict editable install it did not, and the CI job failed on ``models.gpt2.ENTRY``)."""
    import subprocess
    import sys

    code = "import onnxruntime.quantization\nfrom models.zoo import ZOO\nprint(sorted(ZOO))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gpt2" in done.stdout
