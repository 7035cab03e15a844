"""Settings every test shares."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Caches (kernel-timing verdicts, TensorRT engines) go to a folder of this test session,
    for the CLI runs it starts too: a developer's own cache must not decide a test, and the
    tests must not write into it."""
    patch = pytest.MonkeyPatch()
    patch.setenv("OVO_CACHE_DIR", str(tmp_path_factory.mktemp("ovo-cache")))
    yield
    patch.undo()
