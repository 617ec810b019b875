"""``cwa run`` with the original runner's analysis switches, ending in the report (toy model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cwa.store import Store
from cwa.store.query import query

SWITCHES = (
    "--weight-analysis",
    "--architecture-analysis",
    "--temporal-stability",
    "--downstream-tasks",
    "--advanced-perturbations",
    "--save-plots",
)


def test_run_help_explains_every_switch(cli) -> None:
    result = cli("run", "--help")
    assert result.exit_code == 0
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # Rich's help boxes
    for switch in SWITCHES:
        assert switch in text
    assert "clusters and correlation" in text and "profile analyzer" in text
    assert "stability analyzer" in text and "hellaswag and lambada" in text
    assert "k-curve" in text and "report" in text


def test_temporal_stability_needs_two_seeds_and_registers_nothing(cli, store_path) -> None:
    result = cli("run", "--model", "toy", "--temporal-stability", "--seeds", "0")
    assert result.exit_code == 2
    assert "Error: --temporal-stability" in result.stderr and "--seeds" in result.stderr
    if (store_path / "cwa.duckdb").exists():
        assert query(Store.open(store_path), "SELECT * FROM runs").height == 0


@pytest.mark.slow
def test_run_with_every_switch_writes_report_plots_and_analysis_files(
    cli, store_path: Path, tmp_path: Path, toy_model_path, one_thread
) -> None:
    out = tmp_path / "results"
    result = cli(
        "--json", "run", "--model", "toy", "--topk", "200", "--seeds", "0,1", "--limit", "20",
        "--n-samples", "8", "--seq-len", "64", *SWITCHES, "--out-dir", str(out),
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    store = Store.open(store_path)
    runs = query(store, "SELECT run_id, stage, status, config FROM runs ORDER BY run_id")
    assert set(runs["status"]) == {"succeeded"}
    stages = runs["stage"].to_list()
    assert stages.count("score") == 2  # --temporal-stability: one score run per seed
    assert stages.count("perturb") == 2  # main k-curve + clustered perturbation
    assert stages.count("report") == 1
    analyzers = sorted(json.loads(c)["analyzer"] for s, c in
                       zip(stages, runs["config"].to_list(), strict=True) if s == "analyze")
    assert analyzers == ["clusters", "correlation", "effects", "profile", "stability"]
    # --advanced-perturbations: k = 200/100, 200/10, 200; --downstream-tasks adds the tasks.
    conditions = query(store, "SELECT DISTINCT k FROM perturbation_conditions "
                              "WHERE selection = 'top_k' ORDER BY k")
    assert conditions["k"].to_list() == [2, 20, 200]
    tasks = set(query(store, "SELECT DISTINCT task FROM evaluations")["task"])
    assert {"perplexity", "hellaswag", "lambada"} <= tasks
    clustered = query(store, "SELECT DISTINCT selection FROM perturbation_conditions "
                             "WHERE selection LIKE 'cluster:%'")
    assert clustered.height == 1
    # The report: parents are the runs shown; the files are in --out-dir too.
    report_id = data["report"] and runs.filter(runs["stage"] == "report")["run_id"][0]
    parents = set(query(store, f"SELECT parent_run_id FROM run_parents "
                               f"WHERE run_id = '{report_id}'")["parent_run_id"])
    assert set(runs.filter(runs["stage"] != "report")["run_id"]) == parents
    assert data["report"] == str(out / "report.html")
    html = (out / "report.html").read_text()
    for figure in ("damage_vs_k", "stability_curves", "clusters", "metric_correlation",
                   "layer_correlation", "depth_profile", "task_deltas", "flipped_items"):
        assert f'id="{figure}"' in html, figure
        assert (out / "plots" / f"{figure}.png").is_file()
        assert (out / "plots" / f"{figure}.svg").is_file()
    for table in ("analysis_profile", "analysis_stability_summary", "analysis_clusters",
                  "analysis_correlation", "analysis_effects"):
        assert (out / "analysis" / f"{table}.csv").is_file(), table
    stability = query(store, "SELECT count(*) AS n FROM analysis_stability_summary")["n"][0]
    exported = (out / "analysis" / "analysis_stability_summary.csv").read_text().splitlines()
    assert len(exported) == stability + 1  # every row, plus the header
    assert "Cluster " in html and "random_k sets of the same size" in html
