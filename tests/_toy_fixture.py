"""Session-wide toy-world fixtures: the real toy model is built at most once per test session.

Register from ``tests/conftest.py`` with ``pytest_plugins = ["_toy_fixture"]`` (the tests folder
is on ``sys.path``) or import the fixtures into a test module. The build is memoised in this
module, so the model is trained once even if the fixtures are registered twice.

``CWA_TEST_TOY_CACHE=/some/dir`` reuses a toy cache across sessions (handy on a slow machine);
by default a fresh temporary cache is used, so every session exercises the first build.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

_STATE: dict[str, object] = {}


@pytest.fixture(scope="session")
def toy_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory (not the user's) holding the toy world for this session."""
    if "cache" not in _STATE:
        fixed = os.environ.get("CWA_TEST_TOY_CACHE")
        _STATE["cache"] = Path(fixed) if fixed else tmp_path_factory.mktemp("cwa_toy_cache")
    return _STATE["cache"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def toy_model_path(toy_cache_dir: Path) -> Path:
    """The real toy-gpt2 model folder (built on first use; timing kept in ``toy_build_seconds``)."""
    if "gpt2" not in _STATE:
        from cwa.toy import ensure_toy_model

        start = time.perf_counter()
        _STATE["gpt2"] = ensure_toy_model("gpt2", cache_dir=toy_cache_dir)
        _STATE["gpt2_seconds"] = time.perf_counter() - start
    return _STATE["gpt2"]  # type: ignore[return-value]


@pytest.fixture
def toy_env(toy_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``CWA_CACHE`` at the session toy cache for one test (so ``"toy"`` refs resolve)."""
    monkeypatch.setenv("CWA_CACHE", str(toy_cache_dir))
    return toy_cache_dir
