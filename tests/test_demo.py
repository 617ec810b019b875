"""`cwa demo` on the real toy model: the chain runs offline and shows the science — sign-flipping
the global top-k by grad_x_weight hurts far more than flipping as many random weights."""

from __future__ import annotations

import json

import pytest

from cwa.store import Store


@pytest.mark.slow
def test_demo_chain_and_the_science(cli, toy_model_path, store_path, tmp_path) -> None:
    out_dir = tmp_path / "exported"
    result = cli("--json", "demo", "--out-dir", str(out_dir))
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    runs = payload["runs"]
    assert set(runs) == {"score", "rank", "evaluate", "perturb"}
    with Store(store_path).read() as con:
        statuses = dict(con.execute("SELECT stage, status FROM runs").fetchall())
        assert set(statuses.values()) == {"succeeded"}
        ((k,),) = con.execute(
            "SELECT DISTINCT k FROM perturbation_conditions WHERE run_id = ? "
            "AND selection = 'top_k'",
            [runs["perturb"]],
        ).fetchall()
        ((n_params,),) = con.execute(
            "SELECT sum(numel) FROM tensor_stats WHERE run_id = ?", [runs["score"]]
        ).fetchall()
        # controls change exactly as many weights as the treatment
        counts = con.execute(
            "SELECT selection, min(n_changed), max(n_changed), count(*) FROM "
            "perturbation_conditions WHERE run_id = ? GROUP BY selection",
            [runs["perturb"]],
        ).fetchall()
        ppl = con.execute(
            "SELECT selection, avg(value), any_value(baseline) FROM perturbation_effects "
            "WHERE run_id = ? AND task = 'perplexity' AND metric = 'perplexity' "
            "GROUP BY selection",
            [runs["perturb"]],
        ).fetchall()
    assert k == round(0.0005 * n_params)
    by_sel = {sel: (lo, hi, n) for sel, lo, hi, n in counts}
    assert by_sel["top_k"] == (k, k, 1)
    assert by_sel["random_k"] == (k, k, 3)  # three seeds
    assert by_sel["bottom_k"][0] == by_sel["bottom_k"][1] == k
    mean = {sel: value for sel, value, _ in ppl}
    baseline = ppl[0][2]
    top_damage = mean["top_k"] - baseline
    random_damage = mean["random_k"] - baseline
    assert top_damage > 0
    assert top_damage >= 5 * max(random_damage, 1e-9), (mean, baseline)
    for name in ("top_weights.csv", "perturbation_results.csv", "manifest.json"):
        assert (out_dir / name).is_file()
