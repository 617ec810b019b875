"""MLflow mirror against a temporary SQLite tracking URI (one per test, in the test's store)."""
# ruff: noqa: F811  (pytest fixtures imported from _demo_store are used as arguments)

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _demo_store import demo_store, demo_template  # noqa: F401
from _store_access import store_rows

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


# -- the mirror as researchers use it (issue 14) -------------------------------------------------
def _client(store_path: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{store_path / 'mlflow.db'}")


def _by_stage(client, experiment_id: str) -> dict[str, object]:
    runs = client.search_runs([experiment_id])
    return {r.data.tags["cwa.stage"]: r for r in runs}


def test_demo_runs_in_mlflow_carry_lineage_data_source_and_comparable_metrics(
    demo_store: Path,
) -> None:
    import hashlib

    from safetensors import safe_open

    from cwa.mlflow_mirror import EXPERIMENT_KIND
    from cwa.mlflow_sync import sync_runs

    store = Store.open(demo_store)
    done = dict(sync_runs(store))
    assert len(done) == 4
    client = _client(demo_store)
    experiment = client.get_experiment_by_name("demo")
    assert experiment.tags["mlflow.experimentKind"] == EXPERIMENT_KIND
    runs = _by_stage(client, experiment.experiment_id)
    assert set(runs) == {"score", "rank", "evaluate", "perturb"}
    for stage, run in runs.items():
        assert run.info.run_name.startswith(stage + "-")
        assert run.info.status == "FINISHED"
        assert done[run.data.tags["cwa.run_id"]] == run.info.run_id
        source = run.data.tags["mlflow.source.name"]
        assert source.startswith("cwa demo --limit 12") and source.endswith("(cwa 0.1.0)")
    score, rank, evaluate, perturb = (runs[s] for s in ("score", "rank", "evaluate", "perturb"))

    # Lineage: clickable links to the parents' MLflow runs in the description.
    link = f"(#/experiments/{experiment.experiment_id}/runs/{score.info.run_id})"
    assert link in rank.data.tags["mlflow.note.content"]
    assert f"runs/{rank.info.run_id})" in perturb.data.tags["mlflow.note.content"]
    assert f"runs/{evaluate.info.run_id})" in perturb.data.tags["mlflow.note.content"]
    # ... and from parents to their children.
    assert f"runs/{rank.info.run_id})" in score.data.tags["mlflow.note.content"]
    assert f"runs/{perturb.info.run_id})" in rank.data.tags["mlflow.note.content"]

    # Datasets: calibration on the score run, one evaluation input per task.
    (calibration,) = score.inputs.dataset_inputs
    assert calibration.dataset.name == "toy"
    assert calibration.tags[0].value == "calibration"
    hashes = dict(
        store_rows(
            demo_store,
            "SELECT DISTINCT task, task_config_hash FROM evaluations WHERE run_id = ? "
            "AND condition_id IS NULL",
            [evaluate.data.tags["cwa.run_id"]],
        )
    )
    got = {d.dataset.name: d.dataset.digest for d in evaluate.inputs.dataset_inputs}
    assert got == {task: h[:16] for task, h in hashes.items()}

    # Score mass shares, recomputed from the score file itself.
    score_id = score.data.tags["cwa.run_id"]
    component_of = dict(
        store_rows(
            demo_store, "SELECT parameter, component FROM tensor_stats WHERE run_id = ?", [score_id]
        )
    )
    path = demo_store / "artifacts" / score_id / "scores.safetensors"
    mass: dict[str, float] = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            component = component_of[name].replace(",", "_")
            mass[component] = mass.get(component, 0.0) + float(
                handle.get_tensor(name).double().sum()
            )
    total = sum(mass.values())
    for component, value in mass.items():
        assert score.data.metrics[f"mass_share.component.{component}"] == pytest.approx(
            value / total, rel=1e-5
        )
    loss = store_rows(
        demo_store,
        "SELECT value FROM run_metrics WHERE run_id = ? AND name = 'calibration_loss'",
        [score_id],
    )[0][0]
    assert score.data.metrics["calibration_loss"] == loss

    # Score files are referenced (path + sha256), not copied.
    assert [a.path for a in client.list_artifacts(score.info.run_id)] == ["cwa_artifacts.json"]
    assert score.data.tags["cwa.scores.sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert score.data.tags["cwa.scores.path"] == str(path.resolve())

    # Top-k composition from the ranked rows.
    counts = dict(
        store_rows(
            demo_store,
            "SELECT component, count(*) FROM ranked_weights WHERE run_id = ? GROUP BY ALL",
            [rank.data.tags["cwa.run_id"]],
        )
    )
    for component, n in counts.items():
        share = rank.data.metrics[f"topk_share.component.{component}"]
        assert share == pytest.approx(n / sum(counts.values()))

    # Per-task baseline and damage: mean over seeds minus the baseline, from the raw rows.
    perturb_id = perturb.data.tags["cwa.run_id"]
    base = store_rows(
        demo_store,
        "SELECT value FROM evaluations WHERE run_id = ? AND condition_id IS NULL "
        "AND task = 'perplexity' AND metric = 'perplexity'",
        [perturb_id],
    )[0][0]
    treated = [
        v
        for (v,) in store_rows(
            demo_store,
            "SELECT e.value FROM evaluations e JOIN perturbation_conditions c "
            "USING (run_id, condition_id) WHERE e.run_id = ? AND c.selection = 'random_k' "
            "AND e.task = 'perplexity' AND e.metric = 'perplexity'",
            [perturb_id],
        )
    ]
    assert len(treated) == 2  # two seeds
    assert perturb.data.metrics["baseline.perplexity.perplexity"] == pytest.approx(base)
    assert perturb.data.metrics["damage.random_k.perplexity.perplexity"] == pytest.approx(
        sum(treated) / 2 - base
    )


def test_sync_copy_scores_replaces_the_earlier_copy(demo_store: Path) -> None:
    from cwa.mlflow_sync import sync_runs

    store = Store.open(demo_store)
    first = dict(sync_runs(store, ["latest:score"]))
    second = dict(sync_runs(store, ["latest:score"], copy_scores=True))
    assert first.keys() == second.keys() and first != second
    client = _client(demo_store)
    experiment = client.get_experiment_by_name("demo")
    active = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in active] == list(second.values())
    assert client.get_run(next(iter(first.values()))).info.lifecycle_stage == "deleted"
    names = sorted(a.path for a in client.list_artifacts(next(iter(second.values()))))
    assert names == ["scores.safetensors"]


def test_plots_and_reports_are_copied(store: Store, monkeypatch) -> None:
    monkeypatch.setenv("CWA_MLFLOW", "1")

    def compute(ctx):
        ctx.artifact_path("plots/damage.png", kind="plot").write_bytes(b"\x89PNG fake")
        ctx.artifact_path("report.html", kind="report").write_text("<html>r</html>")
        ctx.artifact_path("scores.safetensors", kind="scores").write_bytes(b"0" * 64)
        return StageOutput(metrics={"n_figures": 1.0})

    outcome = execute_stage(store, StageRequest("report", {"title": "t"}), compute)
    client = _client(store.path)
    top = sorted(a.path for a in client.list_artifacts(outcome.mlflow_run_id))
    assert top == ["cwa_artifacts.json", "plots", "report.html"]
    assert [a.path for a in client.list_artifacts(outcome.mlflow_run_id, "plots")] == [
        "plots/damage.png"
    ]


def test_runs_delete_and_tag_reach_mlflow(cli, demo_store: Path, monkeypatch) -> None:
    from cwa.mlflow_sync import sync_runs

    done = dict(sync_runs(Store.open(demo_store)))
    monkeypatch.setenv("CWA_MLFLOW", "1")
    tagged = cli("runs", "tag", "latest:rank", "paper=fig3", "--note", "keep this one")
    assert tagged.exit_code == 0, tagged.output
    client = _client(demo_store)
    rank_id = run_details(Store(demo_store), "latest:rank").run.run_id
    mirrored = client.get_run(done[rank_id])
    assert mirrored.data.tags["paper"] == "fig3"
    assert mirrored.data.tags["mlflow.note.content"].startswith("keep this one")
    perturb_id = run_details(Store(demo_store), "latest:perturb").run.run_id
    deleted = cli("runs", "delete", perturb_id, "--yes")
    assert deleted.exit_code == 0, deleted.output
    assert client.get_run(done[perturb_id]).info.lifecycle_stage == "deleted"
    assert client.get_run(done[rank_id]).info.lifecycle_stage == "active"


def test_sync_of_an_unknown_run_changes_nothing(cli, demo_store: Path) -> None:
    result = cli("mlflow", "sync", "NOSUCHRUN")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no run matches 'NOSUCHRUN'" in lines[0]
    assert not (demo_store / "mlflow.db").exists()


def test_mlflow_cli_sync_and_ui_address(cli, demo_store: Path) -> None:
    result = cli("--json", "mlflow", "sync", "latest:rank", "latest:score")
    assert result.exit_code == 0, result.output
    pairs = json.loads(result.stdout)
    details = run_details(Store(demo_store), "latest:rank")
    assert [p["run_id"] for p in pairs] == sorted([details.run.run_id, details.run.parents[0][0]])
    assert (
        run_details(Store(demo_store), "latest:rank").run.mlflow_run_id == pairs[1]["mlflow_run_id"]
    )
    url = cli("mlflow", "ui", "--print-url", "--port", "5123")
    assert url.exit_code == 0, url.output
    experiment = _client(demo_store).get_experiment_by_name("demo").experiment_id
    assert url.stdout.strip() == (
        f"http://127.0.0.1:5123/#/experiments/{experiment}/runs?workflowType=machine_learning"
    )


def test_sync_to_an_unreachable_mlflow_is_one_line(cli, demo_store: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unknownscheme://nowhere")
    before = store_rows(demo_store, "SELECT run_id, mlflow_run_id FROM runs ORDER BY run_id")
    result = cli("mlflow", "sync")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknownscheme://nowhere" in lines[0], lines
    assert (
        store_rows(demo_store, "SELECT run_id, mlflow_run_id FROM runs ORDER BY run_id") == before
    )
