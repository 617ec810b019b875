"""The report's figures: for each, the SQL that produces its data and the function that draws it.

A figure has one or more *sources* tried in order (e.g. the analyze stage's depth profile first,
the score run's tensor statistics second). A source is usable when the tables it reads exist,
the runs it needs are in the report, and its query returns enough rows; otherwise the figure is
listed as "not available" with the command that would produce its data. The SQL shown under a
figure in the report is exactly the query that produced its data, with the run ids filled in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Placeholders: {score_run} {rank_run} single quoted ids; {score_runs} {perturb_runs}
# {analyze_runs} comma-separated quoted ids. A source needing an absent one is skipped.


@dataclass(frozen=True)
class Source:
    sql: str
    tables: tuple[str, ...]
    needs: tuple[str, ...]
    min_rows: int = 1
    min_distinct: tuple[str, int] | None = None  # (column, how many distinct values)


@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    caption: str
    draw: str  # "module:function" in cwa.reporting, imported only when drawn
    sources: tuple[Source, ...]
    hint: str  # how to produce the data when it is absent
    options: Callable[[Any], dict[str, Any]] = field(default=lambda runs: {})


_MAIN_CONDITION = """WITH main AS (
    SELECT method, scale, k FROM perturbation_conditions
    WHERE run_id IN ({perturb_runs}) AND selection = 'top_k'
    ORDER BY k DESC, scale DESC NULLS FIRST LIMIT 1
)"""


_PROFILE_RUN = """WITH newest AS (
    SELECT max(run_id) AS run_id FROM analysis_profile
    WHERE run_id IN ({analyze_runs}) AND score_run_id = {score_run}
)"""


def _metric(runs: Any) -> dict[str, Any]:
    return {"metric": runs.score_metric or "score"}


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        name="score_distribution",
        title="Score distribution per component",
        caption="Quantiles of the score per component (per-tensor quantiles weighted by tensor "
        "size); the line runs from the median to the maximum.",
        draw="figures_scores:score_distribution",
        sources=(
            Source(
                sql=_PROFILE_RUN
                + """
SELECT component, p50, p90, p99, max
FROM analysis_profile
WHERE run_id = (SELECT run_id FROM newest) AND score_run_id = {score_run}
  AND level = 'component'
ORDER BY component""",
                tables=("analysis_profile",),
                needs=("score_run", "analyze_runs"),
            ),
            Source(
                sql="""SELECT component,
       sum(p50 * numel) / sum(numel) AS p50,
       sum(p90 * numel) / sum(numel) AS p90,
       sum(p99 * numel) / sum(numel) AS p99,
       sum(p99_9 * numel) / sum(numel) AS p99_9,
       max(max) AS max
FROM tensor_stats
WHERE run_id = {score_run}
GROUP BY component
ORDER BY component""",
                tables=("tensor_stats",),
                needs=("score_run",),
            ),
        ),
        hint="run `cwa score`",
        options=_metric,
    ),
    FigureSpec(
        name="sensitivity_heatmap",
        title="Sensitivity mass by layer and component",
        caption="Share of the run's total score mass held by each component of each block.",
        draw="figures_scores:sensitivity_heatmap",
        sources=(
            Source(
                sql=_PROFILE_RUN
                + """
SELECT layer, component, share AS mass_share
FROM analysis_profile
WHERE run_id = (SELECT run_id FROM newest) AND score_run_id = {score_run}
  AND level = 'layer_component'
ORDER BY layer, component""",
                tables=("analysis_profile",),
                needs=("score_run", "analyze_runs"),
            ),
            Source(
                sql="""SELECT layer, component,
       sum(sum) / (SELECT sum(sum) FROM tensor_stats WHERE run_id = {score_run}) AS mass_share
FROM tensor_stats
WHERE run_id = {score_run} AND layer IS NOT NULL
GROUP BY layer, component
ORDER BY layer, component""",
                tables=("tensor_stats",),
                needs=("score_run",),
            ),
        ),
        hint="run `cwa score`",
    ),
    FigureSpec(
        name="depth_profile",
        title="Depth profile of sensitivity",
        caption="Mean score per weight in each block, with the fitted trend over depth.",
        draw="figures_scores:depth_profile",
        sources=(
            Source(
                sql=_PROFILE_RUN
                + """,
layers AS (
    SELECT layer, mean AS mean_score FROM analysis_profile
    WHERE run_id = (SELECT run_id FROM newest) AND score_run_id = {score_run}
      AND level = 'layer' AND layer IS NOT NULL
),
trend AS (
    SELECT slope, intercept, pattern FROM analysis_depth_trend
    WHERE run_id = (SELECT run_id FROM newest) AND score_run_id = {score_run}
      AND scope = 'model'
)
-- The stored fit is of value / mean value; scale it back to score units.
SELECT l.layer, l.mean_score,
       t.slope * (SELECT avg(mean_score) FROM layers) AS slope,
       t.intercept * (SELECT avg(mean_score) FROM layers) AS intercept,
       false AS log_scale, t.pattern
FROM layers l CROSS JOIN trend t
ORDER BY l.layer""",
                tables=("analysis_profile", "analysis_depth_trend"),
                needs=("score_run", "analyze_runs"),
                min_rows=2,
            ),
            Source(
                sql="""SELECT layer, sum(sum) / sum(numel) AS mean_score
FROM tensor_stats
WHERE run_id = {score_run} AND layer IS NOT NULL
GROUP BY layer
ORDER BY layer""",
                tables=("tensor_stats",),
                needs=("score_run",),
                min_rows=2,
            ),
        ),
        hint="run `cwa score` on a model with at least two layers",
        options=_metric,
    ),
    FigureSpec(
        name="topk_composition",
        title="Composition of the top-k",
        caption="Where the ranked weights sit, by block and component (layer -1 / — = outside "
        "the blocks: embeddings, final norm, lm_head).",
        draw="figures_scores:topk_composition",
        sources=(
            Source(
                sql="""SELECT coalesce(layer, -1) AS layer, component, count(*) AS n
FROM ranked_weights
WHERE run_id = {rank_run}
GROUP BY ALL
ORDER BY ALL""",
                tables=("ranked_weights",),
                needs=("rank_run",),
            ),
        ),
        hint="run `cwa rank`",
    ),
    FigureSpec(
        name="head_heatmap",
        title="Top-k weights per attention head",
        caption="Ranked weights per (layer, head), one panel per projection; k and v count "
        "key-value heads (fewer than query heads under grouped-query attention). Head counts "
        "are the highest head index that holds a ranked weight, plus one.",
        draw="figures_scores:head_heatmap",
        sources=(
            Source(
                sql="""WITH per_head AS (
    SELECT component, layer, head, count(*) AS n
    FROM ranked_weights
    WHERE run_id = {rank_run} AND head IS NOT NULL
      AND component IN ('attn_q', 'attn_k', 'attn_v', 'attn_o')
    GROUP BY ALL
)
SELECT *, max(head) OVER (PARTITION BY component) + 1 AS n_heads
FROM per_head
ORDER BY component, layer, head""",
                tables=("ranked_weights",),
                needs=("rank_run",),
            ),
        ),
        hint="rank attention weights (`cwa rank --mode head`, or a global top-k that reaches "
        "attention)",
    ),
    FigureSpec(
        name="damage_vs_k",
        title="Damage vs number of perturbed weights",
        caption="Perplexity after perturbing the top-k and the controls, relative to the "
        "unperturbed model; the band spans the controls' seeds (min–max).",
        draw="figures_effects:damage_vs_k",
        sources=(
            Source(
                sql="""SELECT selection,
       method || coalesce(' scale=' || CAST(scale AS VARCHAR), '') AS method,
       k, count(*) AS n, avg(ratio) AS mean, min(ratio) AS lo, max(ratio) AS hi
FROM perturbation_effects
WHERE run_id IN ({perturb_runs}) AND task = 'perplexity' AND metric = 'perplexity'
  AND selection <> 'all_k'
GROUP BY ALL
ORDER BY selection, method, k""",
                tables=("perturbation_effects",),
                needs=("perturb_runs",),
                min_distinct=("k", 2),
            ),
        ),
        hint="run `cwa perturb --k-values 10,100,1000 --tasks perplexity`",
    ),
    FigureSpec(
        name="damage_vs_scale",
        title="Damage vs perturbation scale",
        caption="Perplexity ratio against the scale of the perturbation, treatment vs controls "
        "(band: min–max over seeds).",
        draw="figures_effects:damage_vs_scale",
        sources=(
            Source(
                sql="""SELECT selection, method || ' k=' || CAST(k AS VARCHAR) AS method,
       scale, count(*) AS n, avg(ratio) AS mean, min(ratio) AS lo, max(ratio) AS hi
FROM perturbation_effects
WHERE run_id IN ({perturb_runs}) AND task = 'perplexity' AND metric = 'perplexity'
  AND scale IS NOT NULL AND selection <> 'all_k'
GROUP BY ALL
ORDER BY selection, method, scale""",
                tables=("perturbation_effects",),
                needs=("perturb_runs",),
                min_distinct=("scale", 2),
            ),
        ),
        hint="run `cwa perturb --method scale --scales 0,0.5,2` (or gaussian_noise)",
    ),
    FigureSpec(
        name="task_deltas",
        title="Downstream task change per selection",
        caption="Accuracy change against the unperturbed model at the main condition (the "
        "largest top-k); error bars: standard deviation over the controls' seeds.",
        draw="figures_effects:task_deltas",
        sources=(
            Source(
                sql=_MAIN_CONDITION
                + """
SELECT e.task, e.metric, e.selection, count(*) AS n,
       avg(e.delta) AS mean_delta, coalesce(stddev_samp(e.delta), 0) AS std_delta
FROM perturbation_effects e
JOIN main m ON e.method = m.method AND e.k = m.k AND e.scale IS NOT DISTINCT FROM m.scale
WHERE e.run_id IN ({perturb_runs}) AND e.metric IN ('acc', 'acc_norm')
GROUP BY ALL
ORDER BY ALL""",
                tables=("perturbation_effects", "perturbation_conditions"),
                needs=("perturb_runs",),
            ),
        ),
        hint="run `cwa perturb --tasks hellaswag,lambada`",
    ),
    FigureSpec(
        name="superweight_profile",
        title="Super-weight activation profile",
        caption="Largest |activation| into and out of each MLP down projection over the "
        "calibration tokens; a super weight shows as a spike (Yu et al. 2024).",
        draw="figures_effects:superweight_profile",
        sources=(
            Source(
                sql="""SELECT layer, max(input_activation) AS max_input,
       max(output_activation) AS max_output
FROM super_weights
WHERE run_id IN ({score_runs})
GROUP BY layer
ORDER BY layer""",
                tables=("super_weights",),
                needs=("score_runs",),
            ),
        ),
        hint="run `cwa score --metric super_weight`",
    ),
    FigureSpec(
        name="stability_curves",
        title="Ranking stability across seeds",
        caption="Agreement of the global top-k between score runs (seeds) as k grows: Jaccard "
        "and rank-biased overlap, mean over pairs with the interval the analyze stage stored.",
        draw="figures_analysis:stability_curves",
        sources=(
            Source(
                sql="""SELECT statistic, k, n_pairs, mean,
       coalesce(ci_low, min) AS ci_low, coalesce(ci_high, max) AS ci_high
FROM analysis_stability_summary
WHERE run_id = (SELECT max(run_id) FROM analysis_stability_summary
                WHERE run_id IN ({analyze_runs}) AND scope = 'global')
  AND scope = 'global' AND statistic IN ('jaccard', 'rbo')
ORDER BY statistic, k""",
                tables=("analysis_stability_summary",),
                needs=("analyze_runs",),
            ),
        ),
        hint="score with several seeds, then run `cwa analyze --analyzers stability` on them",
    ),
    FigureSpec(
        name="metric_correlation",
        title="Agreement between score runs",
        caption="Spearman rank correlation of the scores of every pair of score runs (different "
        "metrics or seeds) over the same weights.",
        draw="figures_analysis:metric_correlation",
        sources=(
            Source(
                sql="""SELECT
       json_extract_string(ra.config, '$.metric') || ' s' || coalesce(CAST(ra.seed AS VARCHAR), '-')
           || ' ' || right(c.row_key, 4) AS row_key,
       json_extract_string(rb.config, '$.metric') || ' s' || coalesce(CAST(rb.seed AS VARCHAR), '-')
           || ' ' || right(c.col_key, 4) AS col_key,
       c.value
FROM analysis_correlation c
JOIN runs ra ON ra.run_id = c.row_key
JOIN runs rb ON rb.run_id = c.col_key
WHERE c.run_id = (SELECT max(run_id) FROM analysis_correlation
                  WHERE run_id IN ({analyze_runs}) AND kind = 'metric')
  AND c.kind = 'metric' AND c.scope = 'global' AND c.statistic = 'spearman'
ORDER BY c.row_key, c.col_key""",
                tables=("analysis_correlation",),
                needs=("analyze_runs",),
            ),
        ),
        hint="score with two or more metrics or seeds, then run "
        "`cwa analyze --analyzers correlation`",
    ),
    FigureSpec(
        name="layer_correlation",
        title="Similarity of score patterns between layers",
        caption="Spearman correlation between layers of their per-component score profile "
        "(the analyze stage's layer × layer matrix for the primary score run).",
        draw="figures_analysis:layer_correlation",
        sources=(
            Source(
                sql="""SELECT row_key, col_key, value
FROM analysis_correlation
WHERE run_id = (SELECT max(run_id) FROM analysis_correlation
                WHERE run_id IN ({analyze_runs}) AND kind = 'layer')
  AND kind = 'layer' AND statistic = 'spearman'
  AND group_key = (SELECT coalesce(max(group_key) FILTER (group_key = {score_run}),
                                   max(group_key))
                   FROM analysis_correlation
                   WHERE run_id IN ({analyze_runs}) AND kind = 'layer')
  AND scope = (SELECT min(scope) FROM analysis_correlation
               WHERE run_id IN ({analyze_runs}) AND kind = 'layer')
ORDER BY TRY_CAST(regexp_extract(row_key, '(\\d+)', 1) AS INTEGER),
         TRY_CAST(regexp_extract(col_key, '(\\d+)', 1) AS INTEGER)""",
                tables=("analysis_correlation",),
                needs=("analyze_runs", "score_run"),
            ),
        ),
        hint="run `cwa analyze --analyzers correlation` on a score run",
    ),
)


def figure_names() -> list[str]:
    return [spec.name for spec in FIGURES]
