"""The effects analyzer core on hand-built perturbation results, checked against scipy.stats
(t-intervals, Welch) and numpy, and the flipped items against a brute-force comparison."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats

from cwa.analysis.effect_stats import (
    condition_values,
    difference_interval,
    effect_curves,
    effect_sizes,
    flipped_items,
)

RANDOM = [10.2, 10.5, 9.9, 10.1, 10.4]
RANDOM_20 = [10.9, 11.6, 10.7]
NOISE_TOP = {1.0: [14.0, 15.5, 13.2], 2.0: [30.0, 33.0, 29.5]}
NOISE_RANDOM = {1.0: [10.3, 10.1, 10.6], 2.0: [11.0, 12.5, 11.7]}


def _frames() -> tuple[pl.DataFrame, pl.DataFrame]:
    conds, evals = [], []

    def add(run, selection, method, k, seed, value, scale=None, acc=None):
        cid = f"{selection}|{method}|k={k}|s={scale}|seed={seed}"
        conds.append(
            {"run_id": run, "condition_id": cid, "selection": selection, "method": method,
             "scale": scale, "bit": None, "k": k, "seed": seed, "n_changed": k}
        )  # fmt: skip
        evals.append(
            {"run_id": run, "condition_id": cid, "task": "perplexity", "metric": "perplexity",
             "value": value, "task_config_hash": "h1"}
        )  # fmt: skip
        evals.append(
            {"run_id": run, "condition_id": cid, "task": "perplexity", "metric": "tokens",
             "value": 999.0, "task_config_hash": "h1"}
        )  # fmt: skip

    for run, base in (("P1", 10.0), ("P2", 10.0)):
        evals.append(
            {"run_id": run, "condition_id": None, "task": "perplexity", "metric": "perplexity",
             "value": base, "task_config_hash": "h1"}
        )  # fmt: skip
    add("P1", "top_k", "sign_flip", 10, None, 15.0)
    for seed, value in enumerate(RANDOM):
        add("P1", "random_k", "sign_flip", 10, seed, value)
    add("P1", "bottom_k", "sign_flip", 10, None, 10.05)
    add("P1", "all_k", "sign_flip", 5000, None, 80.0)
    add("P1", "top_k", "sign_flip", 20, None, 19.0)
    for seed, value in enumerate(RANDOM_20):
        add("P1", "random_k", "sign_flip", 20, seed, value)
    for scale in (1.0, 2.0):
        for seed, value in enumerate(NOISE_TOP[scale]):
            add("P2", "top_k", "gaussian_noise", 10, seed, value, scale)
        for seed, value in enumerate(NOISE_RANDOM[scale]):
            add("P2", "random_k", "gaussian_noise", 10, seed, value, scale)
    schema_c = {"run_id": pl.String, "condition_id": pl.String, "selection": pl.String,
                "method": pl.String, "scale": pl.Float64, "bit": pl.Int64, "k": pl.Int64,
                "seed": pl.Int64, "n_changed": pl.Int64}  # fmt: skip
    schema_e = {"run_id": pl.String, "condition_id": pl.String, "task": pl.String,
                "metric": pl.String, "value": pl.Float64,
                "task_config_hash": pl.String}  # fmt: skip
    return pl.DataFrame(conds, schema=schema_c), pl.DataFrame(evals, schema=schema_e)


def test_effect_sizes_match_scipy_intervals() -> None:
    conditions, evaluations = _frames()
    effects = effect_sizes(condition_values(conditions, evaluations), level=0.95)
    assert "tokens" not in effects["metric"].to_list()
    # all_k (k = the scope) is never paired with a k=10 treatment
    assert "all_k" not in effects["control"].to_list()
    pairs = sorted(
        zip(effects["perturb_run_id"], effects["treatment"], effects["control"], effects["k"],
            effects["scale"], strict=True),
        key=str,
    )  # fmt: skip
    assert pairs == sorted(
        [
            ("P1", "top_k", "random_k", 10, None),
            ("P1", "top_k", "bottom_k", 10, None),
            ("P1", "top_k", "random_k", 20, None),
            ("P2", "top_k", "random_k", 10, 1.0),
            ("P2", "top_k", "random_k", 10, 2.0),
        ],
        key=str,
    )

    row = effects.filter(perturb_run_id="P1", control="random_k", k=10).row(0, named=True)
    control = np.array(RANDOM)
    assert row["difference"] == pytest.approx(15.0 - control.mean())
    assert row["ratio"] == pytest.approx(15.0 / control.mean())
    # One deterministic treatment value: the interval of the control mean, reflected.
    low, high = stats.ttest_1samp(control, popmean=0).confidence_interval(0.95)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((15.0 - high, 15.0 - low))
    assert row["z"] == pytest.approx((15.0 - control.mean()) / control.std(ddof=1))
    assert row["damage_per_weight"] == pytest.approx((15.0 - 10.0) / 10)
    assert row["control_damage_per_weight"] == pytest.approx((control.mean() - 10.0) / 10)
    assert row["frac_controls_worse"] == 0.0 and row["n_control"] == 5

    single = effects.filter(perturb_run_id="P1", control="bottom_k").row(0, named=True)
    assert single["ci_low"] is None and single["z"] is None  # one control value: no spread
    assert single["difference"] == pytest.approx(15.0 - 10.05)

    # Stochastic treatment (gaussian noise): Welch's interval, as scipy computes it.
    for scale in (1.0, 2.0):
        row = effects.filter(perturb_run_id="P2", scale=scale).row(0, named=True)
        welch = stats.ttest_ind(NOISE_TOP[scale], NOISE_RANDOM[scale], equal_var=False)
        low, high = welch.confidence_interval(0.95)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
        assert row["n_treatment"] == 3
        assert row["treatment_sd"] == pytest.approx(np.std(NOISE_TOP[scale], ddof=1))

    # Another level: the 90% interval is narrower and matches scipy too.
    low90, high90 = difference_interval([15.0], RANDOM, 0.90)
    ref = stats.ttest_1samp(control, popmean=0).confidence_interval(0.90)
    assert (low90, high90) == pytest.approx((15.0 - ref.high, 15.0 - ref.low))


def test_k_and_scale_curves_are_rows() -> None:
    conditions, evaluations = _frames()
    curves = effect_curves(condition_values(conditions, evaluations))
    k_top = curves.filter(curve="k", perturb_run_id="P1", selection="top_k").sort("x")
    assert k_top["x"].to_list() == [10.0, 20.0]
    assert k_top["mean"].to_list() == [15.0, 19.0]
    assert k_top["damage_per_weight"].to_list() == pytest.approx([0.5, 0.45])
    k_random = curves.filter(curve="k", perturb_run_id="P1", selection="random_k").sort("x")
    assert k_random["mean"].to_list() == pytest.approx([np.mean(RANDOM), np.mean(RANDOM_20)])
    assert k_random["sd"].to_list() == pytest.approx(
        [np.std(RANDOM, ddof=1), np.std(RANDOM_20, ddof=1)]
    )
    # bottom_k has one k only: no curve; all_k neither.
    assert curves.filter(selection="bottom_k").height == 0
    scale_top = curves.filter(curve="scale", perturb_run_id="P2", selection="top_k").sort("x")
    assert scale_top["x"].to_list() == [1.0, 2.0]
    assert scale_top["mean"].to_list() == pytest.approx([np.mean(v) for v in NOISE_TOP.values()])
    assert curves.filter(curve="scale", perturb_run_id="P1").height == 0


def test_flipped_items_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    conditions = pl.DataFrame(
        {"run_id": ["P1"] * 3, "condition_id": ["a", "b", "c"],
         "selection": ["top_k", "random_k", "random_k"], "k": [10, 10, 10], "seed": [None, 0, 1]},
        schema_overrides={"seed": pl.Int64},
    )  # fmt: skip
    n = 40
    base_acc = rng.integers(0, 2, n).astype(float)
    rows = []
    for cid in (None, "a", "b", "c"):
        acc = base_acc if cid is None else np.where(rng.random(n) < 0.3, 1 - base_acc, base_acc)
        for i in range(n):
            rows.append(
                {"run_id": "P1", "condition_id": cid, "task": "hellaswag", "item_index": i,
                 "gold": 1, "prediction": int(acc[i]), "acc": float(acc[i]),
                 "task_config_hash": "h2"}
            )  # fmt: skip
    items = pl.DataFrame(rows, schema_overrides={"condition_id": pl.String})
    summary, flips = flipped_items(conditions, items)
    for cid in ("a", "b", "c"):
        mine = [r for r in rows if r["condition_id"] == cid]
        expected = [r["item_index"] for r in mine if r["acc"] != base_acc[r["item_index"]]]
        c2w = sum(1 for r in mine if base_acc[r["item_index"]] == 1 and r["acc"] == 0)
        w2c = sum(1 for r in mine if base_acc[r["item_index"]] == 0 and r["acc"] == 1)
        got = summary.filter(condition_id=cid).row(0, named=True)
        assert got["n_items"] == n and got["n_flipped"] == len(expected)
        assert (got["correct_to_wrong"], got["wrong_to_correct"]) == (c2w, w2c)
        assert sorted(flips.filter(condition_id=cid)["item_index"].to_list()) == expected


def test_stored_roles_decide_treatment_controls_and_bounds() -> None:
    """With the conditions' role column (migration 0006) a bound of the treatment's size is
    still not a control, and a plugin control unknown to this process counts as a control."""
    conditions = pl.DataFrame(
        {"run_id": ["P"] * 4, "condition_id": ["t", "b", "c0", "c1"],
         "selection": ["cluster:3", "all_k", "my_plugin", "my_plugin"],
         "method": ["zero"] * 4, "scale": [None] * 4, "bit": [None] * 4, "k": [7] * 4,
         "seed": [None, None, 0, 1], "n_changed": [7] * 4,
         "role": ["treatment", "bound", "control", "control"]},
        schema_overrides={"scale": pl.Float64, "bit": pl.Int64, "seed": pl.Int64},
    )  # fmt: skip
    evaluations = pl.DataFrame(
        {"run_id": ["P"] * 5, "condition_id": [None, "t", "b", "c0", "c1"],
         "task": ["perplexity"] * 5, "metric": ["perplexity"] * 5,
         "value": [2.0, 9.0, 50.0, 2.5, 3.5], "task_config_hash": ["h"] * 5},
        schema_overrides={"condition_id": pl.String},
    )  # fmt: skip
    values = condition_values(conditions, evaluations)
    effects = effect_sizes(values)
    assert effects.select("treatment", "control").rows() == [("cluster:3", "my_plugin")]
    row = effects.row(0, named=True)
    assert row["difference"] == pytest.approx(9.0 - 3.0)
    assert row["damage_per_weight"] == pytest.approx((9.0 - 2.0) / 7)
    low, high = stats.ttest_1samp([2.5, 3.5], popmean=0).confidence_interval(0.95)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((9.0 - high, 9.0 - low))
