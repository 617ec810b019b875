"""The report's figures: for each, the SQL that produces its data and the function that draws it.

A figure has one or more *sources* tried in order (e.g. the analyze stage's depth profile first,
the score run's tensor statistics second). A source is usable when the tables it reads exist,
the runs it needs are in the report, and its query returns enough rows; otherwise the figure is
listed as "not available" with the command that would produce its data. The SQL shown under a
figure in the report is exactly the query that produced its data, with the run ids filled in.
"""

from __future__ import annotations

from typing import Any

from cwa.reporting.catalog_analysis import ANALYSIS_FIGURES
from cwa.reporting.spec import FigureSpec, Source

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
        title="Attention heads",
        caption="Per (layer, head), one panel per projection: the mean |score| of the head's "
        "weights (profile analyzer), else the number of top-k weights in it (then the head "
        "count is the highest head index holding a ranked weight, plus one). k and v count "
        "key-value heads, fewer than query heads under grouped-query attention.",
        draw="figures_scores:head_heatmap",
        sources=(
            Source(
                sql=_PROFILE_RUN
                + """
SELECT component, layer, head, mean AS mean_score,
       max(head) OVER (PARTITION BY component) + 1 AS n_heads
FROM analysis_profile
WHERE run_id = (SELECT run_id FROM newest) AND score_run_id = {score_run}
  AND level = 'head' AND component IN ('attn_q', 'attn_k', 'attn_v', 'attn_o')
ORDER BY component, layer, head""",
                tables=("analysis_profile",),
                needs=("score_run", "analyze_runs"),
            ),
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
        hint="run `cwa analyze profile` (or rank attention weights: `cwa rank --mode head`)",
        options=_metric,
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
  AND selection <> 'all_k' AND selection NOT LIKE 'cluster:%'
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
                sql="""WITH newest AS (
    SELECT max(run_id) AS run_id FROM analysis_super_weight_profile
    WHERE run_id IN ({analyze_runs})
)
SELECT layer, max(max_input_abs) AS max_input, max(max_output_abs) AS max_output
FROM analysis_super_weight_profile
WHERE run_id = (SELECT run_id FROM newest) AND layer IS NOT NULL
  AND (round IS NULL OR round = 1)
GROUP BY layer
ORDER BY layer""",
                tables=("analysis_super_weight_profile",),
                needs=("analyze_runs",),
            ),
            Source(
                sql="""WITH newest AS (
    SELECT max(run_id) AS run_id FROM activation_profile WHERE run_id IN ({score_runs})
)
-- Round 1: the activations before any detected super weight is removed.
SELECT layer, max(max_input_abs) AS max_input, max(max_output_abs) AS max_output
FROM activation_profile
WHERE run_id = (SELECT run_id FROM newest) AND round = 1 AND layer IS NOT NULL
GROUP BY layer
ORDER BY layer""",
                tables=("activation_profile",),
                needs=("score_runs",),
            ),
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
        name="flipped_items",
        title="Items flipped by the treatment vs the controls",
        caption="Task items whose answer changed against the unperturbed model at the main "
        "condition (the largest top-k): mean over each selection's conditions, whiskers min–max "
        "over seeds.",
        draw="figures_effects:flipped_items",
        sources=(
            Source(
                sql=_MAIN_CONDITION
                + """
SELECT f.task, f.selection, count(*) AS n, avg(f.n_flipped) AS mean_flipped,
       min(f.n_flipped) AS lo, max(f.n_flipped) AS hi
FROM analysis_effect_flips f
JOIN perturbation_conditions pc
    ON pc.run_id = f.perturb_run_id AND pc.condition_id = f.condition_id
JOIN main m ON pc.method = m.method AND pc.k = m.k AND pc.scale IS NOT DISTINCT FROM m.scale
WHERE f.run_id = (SELECT max(run_id) FROM analysis_effect_flips
                  WHERE run_id IN ({analyze_runs}))
  AND f.perturb_run_id IN ({perturb_runs})
GROUP BY ALL
ORDER BY ALL""",
                tables=("analysis_effect_flips", "perturbation_conditions"),
                needs=("analyze_runs", "perturb_runs"),
            ),
            Source(
                sql=_MAIN_CONDITION
                + """,
conditions AS (
    SELECT pc.run_id, pc.condition_id, pc.selection
    FROM perturbation_conditions pc
    JOIN main m ON pc.method = m.method AND pc.k = m.k AND pc.scale IS NOT DISTINCT FROM m.scale
    WHERE pc.run_id IN ({perturb_runs})
),
tasks AS (
    SELECT DISTINCT run_id, task FROM evaluation_items
    WHERE run_id IN ({perturb_runs}) AND condition_id IS NULL
),
flips AS (
    SELECT run_id, condition_id, task, count(*) AS n_flipped
    FROM flipped_items WHERE run_id IN ({perturb_runs})
    GROUP BY ALL
),
per_condition AS (
    SELECT t.task, c.selection, coalesce(f.n_flipped, 0) AS n_flipped
    FROM conditions c
    JOIN tasks t ON t.run_id = c.run_id
    LEFT JOIN flips f
        ON f.run_id = c.run_id AND f.condition_id = c.condition_id AND f.task = t.task
)
SELECT task, selection, count(*) AS n, avg(n_flipped) AS mean_flipped,
       min(n_flipped) AS lo, max(n_flipped) AS hi
FROM per_condition
GROUP BY ALL
ORDER BY ALL""",
                tables=("flipped_items", "evaluation_items", "perturbation_conditions"),
                needs=("perturb_runs",),
            ),
        ),
        hint="run `cwa perturb --tasks hellaswag,lambada` with a cwa that records per-item "
        "results",
    ),
) + ANALYSIS_FIGURES


def figure_names() -> list[str]:
    return [spec.name for spec in FIGURES]
