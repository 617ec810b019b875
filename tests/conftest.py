"""Shared fixtures: every test gets an isolated store, no MLflow unless asked, no hub access."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# huggingface_hub reads these when it is imported, before any fixture runs.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

REPO = Path(__file__).resolve().parents[1]


pytest_plugins = ["_toy_fixture"]


@pytest.fixture(autouse=True)
def _isolated_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy_cache_dir: Path
) -> None:
    monkeypatch.setenv("CWA_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("CWA_MLFLOW", "0")
    # Where a test turns the mirror on, it mirrors before the stage returns (deterministic);
    # tests of the detached mirror set CWA_MLFLOW_MODE=background themselves.
    monkeypatch.setenv("CWA_MLFLOW_MODE", "inline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CWA_DEBUG", raising=False)
    monkeypatch.setenv("CWA_LOCK_TIMEOUT", "20")
    # One toy cache per test session: the toy model is built at most once, then reused.
    monkeypatch.setenv("CWA_CACHE", str(toy_cache_dir))


@pytest.fixture(autouse=True)
def _isolated_registries():
    """Plugins registered by one test (metrics, methods, selections, tasks, analyzers) are
    removed afterwards, so no test sees another's plugin in a registry listing."""
    from contextlib import ExitStack

    import cwa.evaluation.tasks  # noqa: F401  built-in tasks register on import: snapshot them too
    from cwa.analysis import ANALYZERS
    from cwa.evaluation.base import TASKS
    from cwa.metrics import METRICS
    from cwa.perturbation import PERTURBATION_METHODS, SELECTIONS

    with ExitStack() as stack:
        for registry in (METRICS, PERTURBATION_METHODS, SELECTIONS, TASKS, ANALYZERS):
            stack.enter_context(registry.isolated())
        yield


@pytest.fixture
def one_thread():
    """One intra-op torch thread: tiny models on a shared 2-core machine oversubscribe."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path):
    from cwa.store import Store

    return Store.open(store_path)


@pytest.fixture
def cli():
    """Invoke the CLI in-process; returns a function (args) -> click Result."""
    from typer.testing import CliRunner

    from cwa_cli.main import app

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, list(args), input=input)

    return invoke


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random 2-layer GPT-2 with a word-level tokenizer and small data/task files."""
    from _tiny_world import build_tiny_world

    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))
