"""The ``effects`` analyzer: effect sizes of perturb runs, treatment vs matched controls.

Input: one or more perturb runs. Reads ``perturbation_conditions`` and ``evaluations`` (and
``evaluation_items`` where per-item records exist) and computes, with
:mod:`cwa.analysis.effect_stats`: per (run, method, scale, k, task, metric) and control the
difference, ratio, t-interval, z and damage per weight (``analysis_effects``), the k- and
scale-curves (``analysis_effect_curves``), and the items flipped per condition
(``analysis_effect_flips``, ``analysis_flipped_items``).
"""

from __future__ import annotations

from typing import Any

from cwa.analysis.base import AnalysisResult, AnalyzerOption, AnalyzerSpec, DisplayTable
from cwa.errors import InvalidInput

NAME = "effects"
DESCRIPTION = "effect size of treatment vs matched controls, k/scale curves, flipped items"


def _ids(inputs: Any) -> list[str]:
    return [run.run_id for run in inputs.runs]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _conditions(inputs: Any) -> Any:
    ids = _ids(inputs)
    return inputs.query(
        f"SELECT * FROM perturbation_conditions WHERE run_id IN ({_marks(len(ids))}) "
        "ORDER BY run_id, rowid",
        ids,
    )


def _has_table(inputs: Any, name: str) -> bool:
    found = inputs.query(
        "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ?", [name]
    )
    return bool(found["n"][0])


def _validate(inputs: Any, options: dict[str, Any]) -> None:
    from cwa.analysis.effect_stats import selection_role

    conditions = _conditions(inputs)
    for run in inputs.runs:
        mine = conditions.filter(run_id=run.run_id)
        if mine.height == 0:
            raise InvalidInput(f"perturb run {run.run_id} stored no perturbation conditions")
        roles = (
            mine["role"].to_list()
            if "role" in mine.columns and mine["role"].null_count() == 0
            else [selection_role(s) for s in mine["selection"].to_list()]
        )
        if "treatment" not in roles:
            raise InvalidInput(
                f"perturb run {run.run_id} has no treatment condition to compare controls with"
            )


def _with_reused_baselines(inputs: Any, items: Any) -> Any:
    """Per-item rows, plus the baseline items of runs whose baseline was reused from another
    run (its 'baseline' parent), relabelled as the perturb run's own baseline."""
    import polars as pl

    have = set(items.filter(pl.col("condition_id").is_null())["run_id"].unique().to_list())
    extra = []
    for run in inputs.runs:
        if run.run_id in have:
            continue
        for parent, role in run.parents:
            if role != "baseline":
                continue
            rows = inputs.query(
                "SELECT ? AS run_id, condition_id, task, item_index, gold, prediction, acc, "
                "task_config_hash FROM evaluation_items WHERE run_id = ? AND condition_id IS NULL",
                [run.run_id, parent],
            )
            if rows.height:
                extra.append(rows)
    if not extra:
        return items
    return pl.concat([items, *extra], how="vertical_relaxed")


def _run(inputs: Any, options: dict[str, Any], reporter: Any) -> AnalysisResult:
    import polars as pl

    from cwa.analysis.effect_stats import (
        condition_values,
        effect_curves,
        effect_sizes,
        flipped_items,
    )

    ids = _ids(inputs)
    conditions = _conditions(inputs)
    evaluations = inputs.query(
        "SELECT run_id, condition_id, task, metric, value, task_config_hash FROM evaluations "
        f"WHERE run_id IN ({_marks(len(ids))}) ORDER BY run_id, rowid",
        ids,
    )
    values = condition_values(conditions, evaluations)
    effects = effect_sizes(values, level=options["level"])
    curves = effect_curves(values)
    tables: dict[str, Any] = {"analysis_effects": effects, "analysis_effect_curves": curves}
    metrics: dict[str, float] = {"n_effects": float(effects.height)}
    if options["items"] and _has_table(inputs, "evaluation_items"):
        items = inputs.query(
            "SELECT run_id, condition_id, task, item_index, gold, prediction, acc, "
            f"task_config_hash FROM evaluation_items WHERE run_id IN ({_marks(len(ids))})",
            ids,
        )
        items = _with_reused_baselines(inputs, items)
        if items.height:
            summary, flips = flipped_items(conditions, items)
            tables["analysis_effect_flips"] = summary
            tables["analysis_flipped_items"] = flips
            metrics["n_flipped_items"] = float(flips.height)
    if effects.height:
        worst = effects.sort("z", descending=True, nulls_last=True).row(0, named=True)
        if worst["z"] is not None:
            metrics["max_z"] = float(worst["z"])
    shown = effects.filter(pl.col("metric") != "nll")
    display = DisplayTable(
        f"effect sizes ({options['level']:.0%} t-interval of treatment - control)",
        ("task", "metric", "k", "scale", "treatment", "control", "treatment mean", "control mean",
         "difference", "ci low", "ci high", "z", "damage/weight"),
        [
            (r["task"], r["metric"], r["k"], r["scale"], r["treatment"], r["control"],
             r["treatment_mean"], r["control_mean"], r["difference"], r["ci_low"], r["ci_high"],
             r["z"], r["damage_per_weight"])
            for r in shown.iter_rows(named=True)
        ],
    )  # fmt: skip
    return AnalysisResult(tables=tables, metrics=metrics, display=[display])


ANALYZER = AnalyzerSpec(
    name=NAME,
    version="1",
    description=DESCRIPTION,
    input_stages=("perturb",),
    run=_run,
    min_runs=1,
    max_runs=None,
    same_model=False,
    options=(
        AnalyzerOption(
            "level", "float", 0.95, "confidence level of the interval", minimum=0.5, maximum=0.999
        ),
        AnalyzerOption("items", "bool", True, "flipped items where per-item records exist"),
    ),  # fmt: skip
    tables=(
        "analysis_effects",
        "analysis_effect_curves",
        "analysis_effect_flips",
        "analysis_flipped_items",
    ),
    validate=_validate,
)
