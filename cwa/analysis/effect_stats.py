"""Core of the ``effects`` analyzer: how much worse the treatment is than its matched controls.

Input: the ``perturbation_conditions`` and ``evaluations`` rows of one or more perturb runs. A
perturb run has one treatment (``top_k`` or ``cluster:ID``), matched controls (``random_k``,
``bottom_k``, plugins) and unmatched bounds (``all_k``): the ``role`` column of the conditions
(runs stored before it existed: the selection registry's ``role``/``matched`` flags). A
treatment cell is (perturb run, method, scale, bit, k, task, metric, task config); the controls
compared with it are the matched controls of the same run with the same method, scale, bit and
number of selected weights ``k``; bounds appear in the curves only. Values are pooled over
seeds.

Per (treatment cell, control selection), with T the treatment values (one unless the method is
stochastic) and C the control values over seeds:

* ``difference`` = mean(T) - mean(C); ``ratio`` = mean(T) / mean(C);
* ``ci_low``/``ci_high``: a ``level`` (0.95) t-interval of the difference. With one treatment
  value it is the interval of the control mean, mean(C) ± t(n_C-1) · sd(C)/√n_C, reflected
  (the treatment is deterministic, so the uncertainty is the controls' over seeds); with two or
  more treatment values it is Welch's interval (unequal variances, Welch–Satterthwaite degrees
  of freedom). NULL with fewer than two control seeds.
* ``z`` = (mean(T) - mean(C)) / sd(C): how many control standard deviations away the treatment
  is (NULL when sd(C) is 0 or undefined); ``frac_controls_worse`` = share of control values at
  least as far from the baseline as mean(T) in the treatment's direction.
* ``treatment_damage`` = mean(T) - baseline and ``damage_per_weight`` = that / k (and the same
  for the controls): the damage of one perturbed weight on average.

Curves (``curve`` = ``k`` or ``scale``): per (run, selection, method, task, metric) and fixed
scale (k-curve) or fixed k (scale-curve) with at least two points, one row per point with the
mean over seeds, its sd, the damage and the damage per weight.

Flipped items (where per-item records exist, table ``evaluation_items``): per condition and
task, the items whose ``acc`` differs from the unperturbed model's on the same item and task
config, and the counts correct→wrong / wrong→correct.
"""

from __future__ import annotations

import math
from typing import Any

from cwa.errors import InvalidInput

SKIPPED_METRICS = ("tokens",)  # counts, not outcomes
_CELL = ["perturb_run_id", "method", "scale", "bit", "k", "task", "metric", "task_config_hash"]


def selection_role(label: str) -> str:
    """``treatment``, ``control`` (matched) or ``bound`` (unmatched, e.g. ``all_k``) for a
    condition's selection label (``name`` or ``name:param``), from the selection registry, for
    runs stored before conditions recorded their role; unknown names count as controls."""
    from cwa.perturbation import SELECTIONS

    name = label.partition(":")[0]
    if name not in SELECTIONS:
        return "control"
    try:
        from cwa.perturbation.contract import as_selection_spec

        spec = as_selection_spec(SELECTIONS.get(name), name)
    except Exception:  # noqa: BLE001 - a broken plugin entry must not hide the built-ins' roles
        return "control"
    if spec.role == "treatment":
        return "treatment"
    return "control" if spec.matched else "bound"


def difference_interval(
    treatment: list[float], controls: list[float], level: float
) -> tuple[float | None, float | None]:
    """The t-interval of mean(treatment) - mean(controls) (see the module docstring)."""
    from scipy import stats

    n_t, n_c = len(treatment), len(controls)
    if n_c < 2 or n_t < 1:
        return None, None
    mean_t = math.fsum(treatment) / n_t
    mean_c = math.fsum(controls) / n_c
    var_c = math.fsum((x - mean_c) ** 2 for x in controls) / (n_c - 1)
    diff = mean_t - mean_c
    if n_t == 1:
        half = float(stats.t.ppf(0.5 + level / 2, n_c - 1)) * math.sqrt(var_c / n_c)
        return diff - half, diff + half
    var_t = math.fsum((x - mean_t) ** 2 for x in treatment) / (n_t - 1)
    se2 = var_t / n_t + var_c / n_c
    if se2 == 0:
        return diff, diff
    dof = se2**2 / ((var_t / n_t) ** 2 / (n_t - 1) + (var_c / n_c) ** 2 / (n_c - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * math.sqrt(se2)
    return diff - half, diff + half


def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (len(values) - 1))


def condition_values(conditions: Any, evaluations: Any) -> Any:
    """Each condition's metric values next to its run's baseline (polars frame).

    ``conditions``: perturbation_conditions rows with ``run_id``; ``evaluations``: evaluations
    rows of the same runs, baselines included (``condition_id`` NULL).
    """
    import polars as pl

    evals = evaluations.filter(~pl.col("metric").is_in(list(SKIPPED_METRICS)))
    baseline = evals.filter(pl.col("condition_id").is_null()).select(
        "run_id", "task", "metric", "task_config_hash", pl.col("value").alias("baseline")
    )
    if baseline.select(["run_id", "task", "metric", "task_config_hash"]).is_duplicated().any():
        raise InvalidInput("a perturb run holds two baselines for one task config; re-run it")
    values = evals.filter(pl.col("condition_id").is_not_null()).join(
        conditions.select(
            "run_id",
            "condition_id",
            "selection",
            "method",
            "scale",
            "bit",
            "k",
            "seed",
            "n_changed",
            *(["role"] if "role" in conditions.columns else []),
        ),
        on=["run_id", "condition_id"],
    )
    values = values.join(baseline, on=["run_id", "task", "metric", "task_config_hash"], how="left")
    roles = {s: selection_role(s) for s in values["selection"].unique().to_list()}
    fallback = pl.col("selection").replace_strict(roles, return_dtype=pl.String)
    stored = pl.col("role") if "role" in values.columns else pl.lit(None, dtype=pl.String)
    return (
        values.rename({"run_id": "perturb_run_id"})
        .with_columns(pl.coalesce(stored, fallback).alias("role"))
        .select(pl.exclude("role"), "role")
    )


def _nullable_key(frame: Any, cols: list[str]) -> Any:
    return frame.group_by(cols, maintain_order=True)


def effect_sizes(values: Any, level: float = 0.95) -> Any:
    """One row per (treatment cell, control selection) (see the module docstring)."""
    import polars as pl

    if not 0 < level < 1:
        raise InvalidInput(f"confidence level must be between 0 and 1, got {level}")
    rows: list[dict[str, Any]] = []
    for key, cell in _nullable_key(values, _CELL):
        cell_key = dict(zip(_CELL, key, strict=True))
        treated = cell.filter(role="treatment")
        if treated.height == 0:
            continue
        for (label,), group in treated.group_by(["selection"], maintain_order=True):
            t_values = group["value"].to_list()
            mean_t, sd_t = _stats(t_values)
            baseline = group["baseline"][0]
            for (control,), ctrl in cell.filter(role="control").group_by(
                ["selection"], maintain_order=True
            ):
                c_values = ctrl["value"].to_list()
                mean_c, sd_c = _stats(c_values)
                low, high = difference_interval(t_values, c_values, level)
                diff = mean_t - mean_c
                worse = None
                if baseline is not None and mean_t != baseline:
                    sign = 1.0 if mean_t > baseline else -1.0
                    worse = sum(sign * (c - mean_t) >= 0 for c in c_values) / len(c_values)
                k = int(cell_key["k"])
                rows.append(
                    {
                        **cell_key,
                        "treatment": label,
                        "control": control,
                        "n_treatment": len(t_values),
                        "n_control": len(c_values),
                        "baseline": baseline,
                        "treatment_mean": mean_t,
                        "treatment_sd": sd_t,
                        "control_mean": mean_c,
                        "control_sd": sd_c,
                        "difference": diff,
                        "ratio": None if mean_c == 0 else mean_t / mean_c,
                        "ci_low": low,
                        "ci_high": high,
                        "ci_level": level,
                        "z": None if not sd_c else diff / sd_c,
                        "frac_controls_worse": worse,
                        "treatment_damage": None if baseline is None else mean_t - baseline,
                        "control_damage": None if baseline is None else mean_c - baseline,
                        "damage_per_weight": None if baseline is None else (mean_t - baseline) / k,
                        "control_damage_per_weight": (
                            None if baseline is None else (mean_c - baseline) / k
                        ),
                    }
                )
    return pl.DataFrame(rows, schema=effect_schema(), orient="row")


def effect_curves(values: Any) -> Any:
    """k-curve and scale-curve points per selection (see the module docstring)."""
    import polars as pl

    points = (
        values.group_by(
            [
                "perturb_run_id",
                "selection",
                "role",
                "method",
                "scale",
                "bit",
                "k",
                "task",
                "metric",
                "task_config_hash",
            ],
            maintain_order=True,
        )
        .agg(
            pl.len().alias("n"),
            pl.col("value").mean().alias("mean"),
            pl.col("value").std().alias("sd"),
            pl.col("baseline").first().alias("baseline"),
        )
        .with_columns(
            (pl.col("mean") - pl.col("baseline")).alias("damage"),
            ((pl.col("mean") - pl.col("baseline")) / pl.col("k")).alias("damage_per_weight"),
        )
    )
    common = [
        "perturb_run_id",
        "selection",
        "role",
        "method",
        "bit",
        "task",
        "metric",
        "task_config_hash",
    ]
    frames = []
    for curve, x, fixed in (("k", "k", "scale"), ("scale", "scale", "k")):
        counts = points.group_by([*common, fixed]).agg(pl.col(x).n_unique().alias("_points"))
        curve_rows = (
            points.join(counts, on=[*common, fixed], nulls_equal=True)
            .filter(pl.col("_points") >= 2)
            .select(
                pl.lit(curve).alias("curve"),
                *common,
                pl.col(fixed).cast(pl.Float64).alias("fixed_value"),
                pl.col(x).cast(pl.Float64).alias("x"),
                "n",
                "mean",
                "sd",
                "baseline",
                "damage",
                "damage_per_weight",
            )
        )
        frames.append(curve_rows)
    return pl.concat(frames).sort(["curve", *common[:2], "fixed_value", "x"], nulls_last=True)


def flipped_items(conditions: Any, items: Any) -> tuple[Any, Any]:
    """(per-condition flip counts, the flipped items) from ``evaluation_items`` rows.

    ``items`` holds the per-item rows of the perturb runs' conditions and of their baselines
    (``condition_id`` NULL, with ``run_id`` the perturb run). Items are matched on (task,
    task_config_hash, item_index).
    """
    import polars as pl

    key = ["run_id", "task", "task_config_hash", "item_index"]
    base = items.filter(pl.col("condition_id").is_null()).select(
        *key, pl.col("acc").alias("baseline_acc"), pl.col("prediction").alias("baseline_prediction")
    )
    perturbed = items.filter(pl.col("condition_id").is_not_null()).join(
        conditions.select("run_id", "condition_id", "selection", "k", "seed"),
        on=["run_id", "condition_id"],
    )
    joined = perturbed.join(base, on=key, how="inner")
    flips = joined.filter(pl.col("acc") != pl.col("baseline_acc"))
    summary = joined.group_by(
        ["run_id", "condition_id", "selection", "k", "seed", "task", "task_config_hash"],
        maintain_order=True,
    ).agg(
        pl.len().alias("n_items"),
        (pl.col("acc") != pl.col("baseline_acc")).sum().alias("n_flipped"),
        ((pl.col("baseline_acc") > 0) & (pl.col("acc") == 0)).sum().alias("correct_to_wrong"),
        ((pl.col("baseline_acc") == 0) & (pl.col("acc") > 0)).sum().alias("wrong_to_correct"),
    )
    flips = flips.select(
        "run_id",
        "condition_id",
        "selection",
        "task",
        "task_config_hash",
        "item_index",
        "gold",
        "baseline_prediction",
        "prediction",
        "baseline_acc",
        "acc",
    )
    return (
        summary.rename({"run_id": "perturb_run_id"}),
        flips.rename({"run_id": "perturb_run_id"}),
    )


def effect_schema() -> dict[str, Any]:
    """Column types of the effects table (the order of ``analysis_effects``)."""
    import polars as pl

    f64, i64, text = pl.Float64, pl.Int64, pl.String
    return {
        "perturb_run_id": text, "method": text, "scale": f64, "bit": i64, "k": i64,
        "task": text, "metric": text, "task_config_hash": text, "treatment": text,
        "control": text, "n_treatment": i64, "n_control": i64, "baseline": f64,
        "treatment_mean": f64, "treatment_sd": f64, "control_mean": f64, "control_sd": f64,
        "difference": f64, "ratio": f64, "ci_low": f64, "ci_high": f64, "ci_level": f64,
        "z": f64, "frac_controls_worse": f64, "treatment_damage": f64, "control_damage": f64,
        "damage_per_weight": f64, "control_damage_per_weight": f64,
    }  # fmt: skip
