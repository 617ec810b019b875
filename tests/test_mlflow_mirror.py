"""MLflow mirror against a temporary SQLite tracking URI."""

from __future__ import annotations

from pathlib import Path

import pytest

from cwa.lifecycle import StageOutput, StageRequest, execute_stage
from cwa.mlflow_mirror import flatten_config
from cwa.progress import RecordingReporter
from cwa.store import Store, run_details


def test_run_params_tags_metrics_artifacts_visible_in_mlflow(store: Store, monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("CWA_MLFLOW", "1")
    parent = execute_stage(
        store,
        StageRequest("score", {"metric": "magnitude"}, seed=1, experiment="study-a"),
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
            experiment="study-a",
            parents=[(parent.run_id, "scores")],
        ),
        compute,
    )
    assert child.mlflow_run_id is not None
    assert run_details(store, child.run_id).run.mlflow_run_id == child.mlflow_run_id
    mlflow.set_tracking_uri(f"sqlite:///{store.mlflow_db_path}")
    frame = mlflow.search_runs(experiment_names=["study-a"], output_format="list")
    by_cwa_id = {r.data.tags["cwa.run_id"]: r for r in frame}
    assert set(by_cwa_id) == {parent.run_id, child.run_id}
    mirrored = by_cwa_id[child.run_id]
    assert mirrored.data.params == {"topk": "10", "mode.name": "global"}
    assert mirrored.data.metrics == {"n_ranked": 10.0, "max_score": 0.5}
    assert mirrored.data.tags["cwa.stage"] == "rank"
    assert mirrored.data.tags["cwa.parents"] == parent.run_id
    assert mirrored.data.tags["cwa.seed"] == "1"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store.mlflow_db_path}")
    assert [a.path for a in client.list_artifacts(mirrored.info.run_id)] == ["top_weights.csv"]
    assert Path(store.path, "mlflow-artifacts").is_dir()


def test_mlflow_failure_is_a_warning_and_loses_nothing(store: Store, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unknownscheme://nowhere")
    reporter = RecordingReporter()
    outcome = execute_stage(
        store,
        StageRequest("score", {"a": 1}),
        lambda ctx: StageOutput(metrics={"loss": 1.0}),
        reporter=reporter,
        mlflow=True,
    )
    assert outcome.mlflow_run_id is None
    assert len(reporter.warnings) == 1 and "safe in the DuckDB store" in reporter.warnings[0]
    details = run_details(store, outcome.run_id)
    assert details.run.status == "succeeded" and details.metrics == {"loss": 1.0}


def test_no_mlflow_flag_and_env(store: Store, monkeypatch) -> None:
    monkeypatch.setenv("CWA_MLFLOW", "0")
    outcome = execute_stage(store, StageRequest("score", {}), lambda ctx: StageOutput())
    assert outcome.mlflow_run_id is None
    assert not store.mlflow_db_path.exists()


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"a": 1, "b": {"c": [1, 2], "d": None}}, {"a": "1", "b.c": "[1, 2]", "b.d": "None"}),
        ({"long": "x" * 7000}, {"long": "x" * 6000}),
    ],
)
def test_flatten_config(config, expected) -> None:
    assert flatten_config(config) == expected
