"""The report stage on a store of known results: lineage, numbers, artifacts, validation, MLflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from _report_store import (
    ACC_BASELINE,
    PPL_BASELINE,
    RANDOM_ACC,
    RANDOM_PPL,
    STABILITY,
    TOP_ACC,
    TOP_PPL,
    build_report_world,
)

from cwa.errors import CwaError, InvalidInput, RunNotFound
from cwa.stages.report import ReportConfig, run_report
from cwa.store import Store
from cwa.store.query import query


def _runs(store: Store):
    return query(store, "SELECT run_id, status FROM runs ORDER BY run_id").rows()


def test_report_of_a_perturb_run_follows_lineage_and_states_the_numbers(store: Store) -> None:
    world = build_report_world(store)
    outcome = run_report(store, ReportConfig(runs=[world.perturb], formats=["png", "svg"]),
                         mlflow=False)
    value = outcome.value
    # Parents: the perturb run, its rank, score and baseline runs, and the analysis of the
    # score run (its inputs include the primary score run); not the other seeds' score runs.
    parents = dict(query(store, f"SELECT parent_run_id, role FROM run_parents "
                                f"WHERE run_id = '{outcome.run_id}'").rows())
    assert parents == {world.perturb: "perturb", world.rank: "rank", world.score: "score",
                       world.evaluate: "evaluate", world.analyze: "analyze"}
    # The headline: top-100 perplexity ratio, and the random controls' mean ± std of ratios.
    ratios = np.array(RANDOM_PPL[100]) / PPL_BASELINE
    total = sum(r["numel"] for r in world.tensor_stats)
    headline = value["findings"][0]
    assert headline.startswith(f"Sign-flipping the top 100 weights ({100 / total * 100:.2g}% ")
    assert f"multiplies perplexity by {TOP_PPL[100] / PPL_BASELINE:.0f}" in headline
    assert f"3 random_k sets of the same size: {ratios.mean():.2f} ± {ratios.std(ddof=1):.2f}" \
        in headline
    accuracy = next(f for f in value["findings"] if "hellaswag acc" in f)
    acc = np.array(RANDOM_ACC[100])
    assert f"from {ACC_BASELINE:.2f} to {TOP_ACC[100]:.2f}" in accuracy
    assert f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f}" in accuracy
    # The effects analyzer's interval, as stored.
    assert ("Against random_k (3 seeds), the top-k raises perplexity by 327 more (95% interval "
            "327 to 327; z = 6,538).") in value["findings"]
    # Figures drawn from the data present; absent data listed with the command to produce it.
    for name in ("score_distribution", "sensitivity_heatmap", "depth_profile",
                 "topk_composition", "head_heatmap", "damage_vs_k", "task_deltas",
                 "stability_curves", "metric_correlation"):
        assert name in value["figures"], value["missing"].get(name)
    assert value["missing"]["damage_vs_scale"].startswith("not available: run `cwa perturb")
    assert "cwa score --metric super_weight" in value["missing"]["superweight_profile"]
    # Artifacts: the page (report), one file per figure and format (plot), the figure data.
    kinds = dict(query(store, f"SELECT name, kind FROM run_artifacts "
                              f"WHERE run_id = '{outcome.run_id}'").rows())
    assert kinds["report.html"] == "report"
    assert kinds["plots/damage_vs_k.png"] == kinds["plots/damage_vs_k.svg"] == "plot"
    assert "plots/damage_vs_k.pdf" not in kinds
    assert kinds["plots/damage_vs_k.csv"] == "table"
    html = Path(value["report"]).read_text()
    assert html.count("data:image/png;base64,") == len(value["figures"])
    assert "not available" in html and world.score in html and "cwa perturb" in html


def test_figure_data_files_hold_the_sql_results(store: Store) -> None:
    world = build_report_world(store)
    outcome = run_report(store, ReportConfig(runs=[world.perturb], formats=["png"]), mlflow=False)
    import polars as pl

    plots = outcome.artifacts_dir / "plots"
    curve = pl.read_csv(plots / "damage_vs_k.csv").filter(pl.col("selection") == "random_k")
    by_k = {row["k"]: row for row in curve.iter_rows(named=True)}
    for k in (10, 100):
        ratios = np.array(RANDOM_PPL[k]) / PPL_BASELINE
        assert by_k[k]["n"] == 3
        assert by_k[k]["mean"] == pytest.approx(ratios.mean())
        assert (by_k[k]["lo"], by_k[k]["hi"]) == pytest.approx((ratios.min(), ratios.max()))
    stability = pl.read_csv(plots / "stability_curves.csv").sort("k")
    assert stability["mean"].to_list() == [m for m, _, _ in STABILITY.values()]
    heads = pl.read_csv(plots / "head_heatmap.csv")
    assert heads.filter(pl.col("component") == "attn_k")["n_heads"].unique().to_list() == [2]
    assert heads.filter(pl.col("component") == "attn_q")["n_heads"].unique().to_list() == [4]
    # The SQL shown under each figure reproduces its data exactly.
    html = Path(outcome.artifacts_dir / "report.html").read_text()
    import html as htmllib

    section = html.split('id="damage_vs_k"')[1].split("</section>")[0]
    sql = htmllib.unescape(re.search(r"<pre>(.*?)</pre>", section, re.S).group(1))
    again = query(store, sql)
    assert again.equals(pl.read_csv(plots / "damage_vs_k.csv"), null_equal=True) or \
        again.sort(again.columns).rows() == pl.read_csv(plots / "damage_vs_k.csv").sort(
            again.columns).rows()


def test_experiment_covers_every_seed_and_out_copies_the_files(store: Store, tmp_path) -> None:
    world = build_report_world(store, experiment="seeds")
    out = tmp_path / "out"
    outcome = run_report(store, ReportConfig(experiment="seeds", out=str(out), formats=["pdf"]),
                         mlflow=False)
    assert set(world.seeds) <= set(outcome.value["runs"])
    assert (out / "report.html").is_file()
    assert (out / "plots" / "damage_vs_k.pdf").read_bytes().startswith(b"%PDF")
    assert not list((out / "plots").glob("*.png"))
    run = query(store, f"SELECT experiment, stage, status FROM runs "
                       f"WHERE run_id = '{outcome.run_id}'").rows()
    assert run == [("seeds", "report", "succeeded")]


def test_missing_data_is_skipped_with_the_command_to_run(store: Store) -> None:
    from cwa.lifecycle import StageOutput, StageRequest, execute_stage

    only = execute_stage(store, StageRequest("evaluate", {}), lambda ctx: StageOutput(),
                         mlflow=False)
    outcome = run_report(store, ReportConfig(runs=[only.run_id]), mlflow=False)
    assert outcome.value["figures"] == []
    missing = outcome.value["missing"]
    assert missing["score_distribution"] == (
        "not available: run `cwa score` (the report has no score run)"
    )
    assert "cwa analyze" in missing["stability_curves"]
    html = Path(outcome.value["report"]).read_text()
    assert "No perturbation or score results" in html


@pytest.mark.parametrize(
    "config, error",
    [
        (ReportConfig(runs=["01NOPE"]), RunNotFound),
        (ReportConfig(formats=["png", "gif"]), InvalidInput),
        (ReportConfig(experiment="no-such-experiment"), RunNotFound),
    ],
)
def test_bad_input_registers_no_run(store: Store, config, error) -> None:
    build_report_world(store, analyze=False)
    before = _runs(store)
    with pytest.raises(error) as info:
        run_report(store, config, mlflow=False)
    assert "\n" not in str(info.value)
    assert _runs(store) == before


def test_unwritable_out_registers_no_run(store: Store, tmp_path) -> None:
    build_report_world(store, analyze=False)
    before = _runs(store)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidInput, match="is a file"):
        run_report(store, ReportConfig(out=str(blocker)), mlflow=False)
    with pytest.raises(InvalidInput, match="not writable"):
        run_report(store, ReportConfig(out=str(blocker / "sub")), mlflow=False)
    assert _runs(store) == before


def test_report_artifacts_are_listed_in_mlflow(store: Store, tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    world = build_report_world(store, analyze=False)
    outcome = run_report(store, ReportConfig(runs=[world.perturb], formats=["png"]), mlflow=True)
    assert outcome.mlflow_run_id is not None
    client = MlflowClient(tracking_uri=uri)
    top = {a.path for a in client.list_artifacts(outcome.mlflow_run_id)}
    assert {"report.html", "plots"} <= top
    plots = {a.path for a in client.list_artifacts(outcome.mlflow_run_id, "plots")}
    assert {f"plots/{name}.png" for name in outcome.value["figures"]} <= plots


def test_cli_report_json_and_errors(cli, store_path: Path, tmp_path) -> None:
    store = Store.open(store_path)
    world = build_report_world(store, analyze=False)
    result = cli("--json", "report", world.perturb[:10], "--formats", "svg",
                 "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["out_report"] == str(tmp_path / "o" / "report.html")
    assert (tmp_path / "o" / "plots" / "damage_vs_k.svg").is_file()
    before = _runs(store)
    bad = cli("report", "--formats", "bmp")
    assert bad.exit_code == 1 and "Error: unknown figure format 'bmp'" in bad.stderr
    assert _runs(store) == before


def test_cli_report_needs_an_existing_store(cli, tmp_path) -> None:
    result = cli("--store", str(tmp_path / "none"), "report")
    assert result.exit_code == 1 and "no store at" in result.stderr
    assert not (tmp_path / "none" / "cwa.duckdb").exists()


def test_library_never_prints(store: Store, capsys) -> None:
    world = build_report_world(store, analyze=False)
    run_report(store, ReportConfig(runs=[world.perturb], formats=["png"]), mlflow=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert issubclass(InvalidInput, CwaError)


def test_flipped_items_and_activation_profile_from_per_item_records(store: Store) -> None:
    import polars as pl
    from _report_store import ACTIVATIONS, CLUSTER_SIZES, FLIPS

    world = build_report_world(store, items=True)
    outcome = run_report(store, ReportConfig(runs=[world.perturb], formats=["png"]), mlflow=False)
    assert {"flipped_items", "superweight_profile", "clusters"} <= set(outcome.value["figures"])
    plots = outcome.artifacts_dir / "plots"
    flips = {r["selection"]: r for r in pl.read_csv(plots / "flipped_items.csv")
             .iter_rows(named=True)}
    assert flips["top_k"]["mean_flipped"] == FLIPS["top_k"] and flips["top_k"]["n"] == 1
    assert flips["bottom_k"]["mean_flipped"] == 0  # conditions that flip nothing still count
    random = np.array(FLIPS["random_k"])
    assert flips["random_k"]["n"] == 3
    assert flips["random_k"]["mean_flipped"] == pytest.approx(random.mean())
    assert (flips["random_k"]["lo"], flips["random_k"]["hi"]) == (random.min(), random.max())
    profile = pl.read_csv(plots / "superweight_profile.csv").sort("layer")
    assert profile["max_input"].to_list() == [v[0] for v in ACTIVATIONS.values()]  # round 1
    assert profile["max_output"].to_list() == [v[1] for v in ACTIVATIONS.values()]
    clusters = pl.read_csv(plots / "clusters.csv")
    sizes = dict(clusters.select("cluster", "size").unique().iter_rows())
    assert sizes == CLUSTER_SIZES
