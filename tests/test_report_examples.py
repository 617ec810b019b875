"""The example workflows in ``examples/`` run offline on the toy models and end in a report.

Each script runs in a subprocess with small limits and the session's toy cache, against its own
store; the test checks the runs it made and the figures its report holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cwa.store import Store
from cwa.store.query import query

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# script -> (report pages, figures each must hold, stages the store must contain)
CASES = {
    "basic_sensitivity.sh": (
        ["report/report.html"],
        ["score_distribution", "topk_composition", "task_deltas", "depth_profile"],
        {"score", "rank", "perturb", "analyze", "report"},
    ),
    "architecture_comparison.sh": (
        ["toy/report.html", "toy-llama/report.html"],
        ["score_distribution", "sensitivity_heatmap", "depth_profile"],
        {"score", "rank", "analyze", "report"},
    ),
    "stability_across_seeds.sh": (
        ["report/report.html"],
        ["stability_curves", "metric_correlation"],
        {"score", "analyze", "report"},
    ),
    "perturbation_effectiveness.sh": (
        ["report/report.html"],
        ["damage_vs_k", "damage_vs_scale", "task_deltas"],
        {"score", "rank", "perturb", "analyze", "report"},
    ),
    "comprehensive_analysis.sh": (
        ["report/report.html"],
        ["damage_vs_k", "stability_curves", "clusters", "depth_profile", "flipped_items"],
        {"score", "rank", "evaluate", "perturb", "analyze", "report"},
    ),
}


def test_every_example_script_is_covered() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.sh") if not p.name.startswith("_")}
    assert scripts == set(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_offline_and_ends_in_a_report(
    script: str, tmp_path: Path, toy_model_path: Path, toy_cache_dir: Path
) -> None:
    if shutil.which("bash") is None or shutil.which("cwa") is None:
        pytest.skip("needs bash and the installed `cwa` command")
    pages, figures, stages = CASES[script]
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "CWA_STORE": str(tmp_path / "store"),
        "CWA_CACHE": str(toy_cache_dir),
        "CWA_MLFLOW": "0",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "LIMIT": "8",
        "N_SAMPLES": "4",
        "SEQ_LEN": "64",
        "SEEDS": "0,1",
        "TOPK": "100",
    }
    done = subprocess.run(["bash", str(EXAMPLES / script)], env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    for page in pages:
        html = (out / page).read_text()
        for figure in figures:
            assert f'id="{figure}"' in html, (page, figure)
        assert "data:image/png;base64," in html
    assert f"report: {out}" in done.stdout
    runs = query(Store.open(tmp_path / "store"), "SELECT stage, status FROM runs")
    assert set(runs["stage"]) == stages
    assert set(runs["status"]) == {"succeeded"}
