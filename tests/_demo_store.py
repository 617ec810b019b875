"""A small demo-like store (toy model, few items, two seeds), built once per test session.

Import the fixtures into a test module (``from _demo_store import demo_store, demo_template``).
``demo_template`` is built once and must not be changed; ``demo_store`` is a fresh copy of it
for one test (tests that write get their own).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

_STATE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory: pytest.TempPathFactory, toy_cache_dir: Path) -> Path:
    if "template" not in _STATE:
        import torch

        from cwa.stages.pipeline import demo_config, run_demo
        from cwa.store import Store

        path = tmp_path_factory.mktemp("demo_template") / "store"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CWA_CACHE", str(toy_cache_dir))
            mp.setenv("CWA_MLFLOW", "0")
            mp.setenv("HF_HUB_OFFLINE", "1")
            try:
                config = demo_config(seeds=[0, 1], limit=12, command="cwa demo --limit 12")
                if hasattr(config, "analyses"):
                    # The score -> rank -> evaluate -> perturb chain only: the analysis and
                    # report stages have their own tests; their tables exist here, empty.
                    config = dataclasses.replace(config, analyses=type(config.analyses)())
                run_demo(Store.open(path), config, mlflow=False)
            finally:
                torch.set_num_threads(threads)
        _STATE["template"] = path
    return _STATE["template"]


@pytest.fixture
def demo_store(demo_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the demo store, also set as CWA_STORE for CLI calls."""
    path = tmp_path / "demo_store"
    shutil.copytree(demo_template, path)
    monkeypatch.setenv("CWA_STORE", str(path))
    return path
