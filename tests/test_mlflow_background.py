"""The MLflow mirror in a detached process (cwa.mlflow_background) and the CLI's fast exit.

The detached mirror must write exactly what the inline mirror writes, never lose a run (a worker
that never started or died leaves its queue entry for the next worker or `cwa mlflow sync`),
and an unusable mode must be refused before a run exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _store_access import store_rows

from cwa.errors import InvalidInput
from cwa.lifecycle import StageOutput, StageRequest, execute_stage
from cwa.mlflow_background import drain, pending_runs, wait_idle
from cwa.progress import RecordingReporter
from cwa.store import Store

REPO = Path(__file__).resolve().parents[1]


def _client(store: Store):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{store.mlflow_db_path}")


def _pair(store: Store, experiment: str) -> tuple[str, str]:
    """A score run and a rank run made from it (with a copied artifact); their cwa run ids."""
    parent = execute_stage(
        store,
        StageRequest("score", {"metric": "magnitude", "n": 3}, seed=1, experiment=experiment),
        lambda ctx: StageOutput(metrics={"loss": 3.0}),
    )

    def compute(ctx):
        ctx.artifact_path("top_weights.csv", kind="table").write_text("rank,score\n1,0.5\n")
        return StageOutput(metrics={"n_ranked": 10.0, "max_score": 0.5})

    child = execute_stage(
        store,
        StageRequest(
            "rank",
            {"topk": 10, "mode": {"name": "global"}},
            seed=1,
            experiment=experiment,
            parents=[(parent.run_id, "scores")],
        ),
        compute,
    )
    return parent.run_id, child.run_id


def _mirrored(store: Store, run_id: str) -> dict:
    """What MLflow holds for a cwa run, with the run-specific ids replaced by placeholders."""
    client = _client(store)
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`cwa.run_id` = '{run_id}'",
    )
    assert len(found) == 1, f"{len(found)} MLflow runs mirror {run_id}"
    run = found[0]
    ids = dict(store_rows(store.path, "SELECT run_id, mlflow_run_id FROM runs"))
    assert ids[run_id] == run.info.run_id  # DuckDB records the MLflow copy

    def anonymise(text: str) -> str:
        for cwa_id, mlflow_id in ids.items():
            text = text.replace(cwa_id, "<cwa>").replace(cwa_id[-6:].lower(), "<id>")
            if mlflow_id:
                text = text.replace(mlflow_id, "<mlflow>")
        experiment = client.get_experiment(run.info.experiment_id)
        return text.replace(f"experiments/{experiment.experiment_id}/", "experiments/<e>/")

    skip = {"cwa.store"}
    return {
        "status": run.info.status,
        "params": run.data.params,
        "metrics": run.data.metrics,
        "tags": {k: anonymise(v) for k, v in run.data.tags.items() if k not in skip},
        "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
        "inputs": sorted((d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs),
    }


def test_background_mirror_writes_what_the_inline_mirror_writes(store: Store, monkeypatch):
    monkeypatch.setenv("CWA_MLFLOW", "1")
    inline = _pair(store, "study")
    monkeypatch.setenv("CWA_MLFLOW_MODE", "background")
    background = _pair(store, "study")
    # The stage returned before MLflow was written; the workers finish on their own.
    assert wait_idle(store, timeout=180)
    assert pending_runs(store) == []
    for a, b in zip(inline, background, strict=True):
        assert _mirrored(store, b) == _mirrored(store, a)
    # The child's description links to its parent's MLflow run (mirrored first).
    note = _client(store).get_run(_run_ids(store)[background[0]])
    assert "Children:" in note.data.tags["mlflow.note.content"]
    child = _client(store).get_run(_run_ids(store)[background[1]])
    parent_link = f"runs/{_run_ids(store)[background[0]]})"
    assert parent_link in child.data.tags["mlflow.note.content"]


def _run_ids(store: Store) -> dict[str, str]:
    return dict(store_rows(store.path, "SELECT run_id, mlflow_run_id FROM runs"))


def test_a_mirror_that_never_ran_is_caught_up_by_the_next_worker(store: Store, monkeypatch):
    import cwa.mlflow_background as background

    monkeypatch.setenv("CWA_MLFLOW", "1")
    monkeypatch.setenv("CWA_MLFLOW_MODE", "background")

    def no_process(*args, **kwargs):
        raise OSError("cannot fork")

    with monkeypatch.context() as patched:
        patched.setattr(background.subprocess, "Popen", no_process)
        reporter = RecordingReporter()
        first = execute_stage(
            store, StageRequest("score", {"a": 1}), lambda ctx: StageOutput(), reporter=reporter
        )
    assert len(reporter.warnings) == 1 and "cwa mlflow sync" in reporter.warnings[0]
    assert first.mlflow_run_id is None
    assert pending_runs(store) == [first.run_id]  # queued, not lost
    assert _run_ids(store)[first.run_id] is None
    second = execute_stage(store, StageRequest("score", {"a": 2}), lambda ctx: StageOutput())
    assert wait_idle(store, timeout=180)
    assert pending_runs(store) == []
    ids = _run_ids(store)
    assert ids[first.run_id] and ids[second.run_id]
    assert _mirrored(store, first.run_id)["params"] == {"a": "1"}
    assert _mirrored(store, second.run_id)["params"] == {"a": "2"}


def test_sync_takes_over_the_queue_and_drain_then_has_nothing_left(store: Store, monkeypatch):
    import cwa.mlflow_background as background
    from cwa.mlflow_sync import sync_runs

    monkeypatch.setenv("CWA_MLFLOW", "1")
    monkeypatch.setenv("CWA_MLFLOW_MODE", "background")
    monkeypatch.setattr(background.subprocess, "Popen", _dead_worker)
    outcome = execute_stage(store, StageRequest("score", {"a": 1}), lambda ctx: StageOutput())
    # A worker that died before mirroring: its pid is in the queue but no longer alive.
    assert pending_runs(store) == [outcome.run_id]
    assert wait_idle(store, timeout=10)
    done = sync_runs(store)
    assert [r for r, _ in done] == [outcome.run_id]
    assert pending_runs(store) == []
    assert drain(store) == []  # nothing queued twice: one MLflow copy
    assert _mirrored(store, outcome.run_id)["params"] == {"a": "1"}


_POPEN = subprocess.Popen


class _dead_worker:  # noqa: N801 - stands in for subprocess.Popen
    def __init__(self, *args, **kwargs) -> None:
        proc = _POPEN([sys.executable, "-c", "pass"])
        proc.wait()
        self.pid = proc.pid


def test_deleted_run_leaves_the_queue(store: Store, monkeypatch):
    import cwa.mlflow_background as background

    monkeypatch.setenv("CWA_MLFLOW", "1")
    monkeypatch.setenv("CWA_MLFLOW_MODE", "background")
    monkeypatch.setattr(background.subprocess, "Popen", _dead_worker)
    from cwa.store.runs import delete_runs

    outcome = execute_stage(store, StageRequest("score", {"a": 1}), lambda ctx: StageOutput())
    delete_runs(store, outcome.run_id)
    assert drain(store) == []
    assert pending_runs(store) == []


def test_unknown_mirror_mode_is_refused_before_a_run_exists(store: Store, monkeypatch):
    monkeypatch.setenv("CWA_MLFLOW", "1")
    monkeypatch.setenv("CWA_MLFLOW_MODE", "later")
    before = store_rows(store.path, "SELECT count(*) FROM runs")
    with pytest.raises(InvalidInput, match="CWA_MLFLOW_MODE"):
        execute_stage(store, StageRequest("score", {}), lambda ctx: StageOutput())
    assert store_rows(store.path, "SELECT count(*) FROM runs") == before
    monkeypatch.setenv("CWA_MLFLOW", "0")  # the mode does not matter without the mirror
    execute_stage(store, StageRequest("score", {}), lambda ctx: StageOutput())


@pytest.mark.slow
def test_cli_fast_exit_keeps_output_and_exit_codes(tmp_path: Path):
    """`python -m cwa_cli` skips the interpreter teardown after a torch command: the JSON on
    stdout is complete, a success exits 0 and an error 1 with its one-line message."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(
        [sys.executable, "-m", "cwa_cli", "--json", "evaluate", "--model", "toy",
         "--tasks", "lambada", "--limit", "3", "--batch-size", "3"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    payload = json.loads(ok.stdout)
    assert {r["metric"] for r in payload["results"]} == {"acc", "perplexity"}
    items = tmp_path / "lambada.jsonl"
    items.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    bad = subprocess.run(
        [sys.executable, "-m", "cwa_cli", "evaluate", "--model", str(tmp_path / "missing"),
         "--tasks", f"lambada:{items}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("Error: no model folder")
