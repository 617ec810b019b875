"""Report figures drawn from the analyze stage's tables (clusters, stability, correlation).

The SQL picks the newest analyze run among the report's runs that wrote the table.
"""

from __future__ import annotations

from cwa.reporting.spec import FigureSpec, Source

ANALYSIS_FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        name="clusters",
        title="Clusters of critical weights",
        caption="Cluster centres of the analyze stage's clustering (top-N plus a sample of "
        "weights; standardised features) projected on their two principal axes; marker area "
        "∝ cluster size.",
        draw="figures_analysis:clusters",
        sources=(
            Source(
                sql="""WITH newest AS (
    SELECT max(run_id) AS run_id FROM analysis_clusters WHERE run_id IN ({analyze_runs})
)
SELECT c.cluster_id AS cluster, c.size,
       CASE WHEN c.is_noise THEN 'noise'
            ELSE 'c' || c.cluster_id || ' ' || coalesce(c.top_component, '') END AS label,
       m.feature, m.value_scaled
FROM analysis_clusters c
JOIN analysis_cluster_centroids m ON m.run_id = c.run_id AND m.cluster_id = c.cluster_id
WHERE c.run_id = (SELECT run_id FROM newest)
ORDER BY c.cluster_id, m.feature""",
                tables=("analysis_clusters", "analysis_cluster_centroids"),
                needs=("analyze_runs",),
            ),
        ),
        hint="run `cwa analyze --analyzers clusters` on a score run",
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
