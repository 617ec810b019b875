-- Research questions answered with plain SQL over a cwa store.
--
-- Each query sits under a `-- name: NAME` header; the comment line after it describes it.
--   cwa sql --file examples/queries.sql --list                        # names and descriptions
--   cwa sql --file examples/queries.sql --name damage_per_selection   # run one
--   cwa sql --file examples/queries.sql --name damage_for_run --param run=latest:perturb
-- A `-- params: KEY=DEFAULT` line gives a default for a `$KEY` parameter; `--param` overrides it
-- (run references such as `latest:perturb` or an id prefix are resolved to a run id).
-- New queries: append at the END of this file in the same format.

-- name: damage_per_selection
-- Damage per selection of the newest perturb run (mean and spread over seeds).
SELECT selection, task, metric, count(*) AS n, avg(value) AS mean, stddev_samp(value) AS sd,
       any_value(baseline) AS baseline, avg(ratio) AS mean_ratio
FROM perturbation_effects
WHERE run_id = (SELECT max(run_id) FROM runs WHERE stage = 'perturb' AND status = 'succeeded')
  AND metric <> 'tokens'
GROUP BY ALL ORDER BY task, metric, selection;

-- name: damage_for_run
-- Damage per selection of one perturb run, given as --param run=RUN (default: the newest).
-- params: run=latest:perturb
SELECT selection, task, metric, count(*) AS n, avg(value) AS mean, stddev_samp(value) AS sd,
       any_value(baseline) AS baseline, avg(ratio) AS mean_ratio
FROM perturbation_effects
WHERE run_id = $run AND metric <> 'tokens'
GROUP BY ALL ORDER BY task, metric, selection;

-- name: topk_components
-- Which components hold the top-ranked weights of each rank run?
SELECT run_id, component, count(*) AS n_weights, round(avg(score), 6) AS mean_score
FROM ranked_weights GROUP BY ALL ORDER BY run_id, n_weights DESC;

-- name: score_mass_by_layer
-- Sensitivity mass by layer and component for each score run.
SELECT s.run_id, r.config->>'metric' AS metric, s.layer, s.component, sum(s.sum) AS score_mass
FROM tensor_stats s JOIN runs r USING (run_id)
GROUP BY ALL ORDER BY s.run_id, score_mass DESC;

-- name: lineage
-- Every run with its ancestors (lineage), newest first.
SELECT r.run_id, r.stage, r.status, l.ancestor_run_id, l.depth
FROM runs r LEFT JOIN run_lineage l USING (run_id) ORDER BY r.run_id DESC, l.depth;

-- name: topk_overlap_between_seeds
-- Top-100 overlap between global rank runs (ranking stability across score seeds).
WITH top AS (
    SELECT k.run_id, k.parameter, k.flat_index
    FROM ranked_weights k JOIN runs r USING (run_id)
    WHERE r.config->>'mode' = 'global' AND k.rank <= 100
)
SELECT a.run_id AS run_a, b.run_id AS run_b, count(*) / 100.0 AS overlap
FROM top a JOIN top b ON a.parameter = b.parameter AND a.flat_index = b.flat_index
WHERE a.run_id < b.run_id GROUP BY ALL ORDER BY ALL;

-- name: topk_flipped_items
-- Which HellaSwag / LAMBADA items did top_k flip (prediction differs from the run's baseline)?
SELECT run_id, condition_id, k, task, item_index, baseline_prediction, prediction,
       baseline_acc, acc
FROM flipped_items
WHERE selection = 'top_k'
ORDER BY run_id, k, task, item_index;

-- name: most_stable_layers
-- Which layers keep their top-k weights across seeds? (mean Jaccard over run pairs, newest stability analysis)
SELECT layer, k_label, n_pairs, round(jaccard, 4) AS jaccard, round(ci_low, 4) AS ci_low,
       round(ci_high, 4) AS ci_high, stability_rank
FROM analysis_stable_layers
WHERE run_id = (SELECT max(run_id) FROM runs WHERE stage = 'analyze'
                AND config->>'analyzer' = 'stability' AND status = 'succeeded')
ORDER BY k, stability_rank;

-- name: metric_agreement
-- Do two sensitivity metrics agree on which weights matter? (global rank correlation and top-k overlap)
SELECT run_id, metric_a, metric_b, statistic, round(value, 4) AS value, n
FROM analysis_metric_agreement
ORDER BY run_id DESC, metric_a, metric_b, statistic;

-- name: clusters_that_hurt_most
-- Which weight clusters hurt perplexity most per perturbed weight, next to matched random weights? (cwa perturb --treatment cluster:ID)
SELECT perturb_run_id, cluster_id, cluster_size, top_component, top_layer, method, k,
       round(delta, 6) AS delta, damage_per_weight, control_damage_per_weight,
       damage_per_weight / nullif(control_damage_per_weight, 0) AS times_control
FROM cluster_perturbation_damage
WHERE task = 'perplexity' AND metric = 'perplexity'
ORDER BY damage_per_weight DESC;

-- name: effect_sizes_per_selection
-- How far is each treatment from each matched control? (difference, 95% t-interval, z; newest effects analysis)
SELECT perturb_run_id, treatment, control, method, scale, k, task, metric,
       treatment_mean, control_mean, difference, ci_low, ci_high, z, damage_per_weight
FROM analysis_effects
WHERE run_id = (SELECT max(run_id) FROM runs WHERE stage = 'analyze'
                AND config->>'analyzer' = 'effects' AND status = 'succeeded')
ORDER BY task, metric, k, treatment, control;

-- name: verified_super_weights
-- Which super-weight candidates are real? (zeroing one alone vs zeroing random weights of its tensor)
SELECT score_run_id, layer, parameter, row_index, column_index, weight_value, baseline, zeroed,
       round(ratio, 3) AS ratio, round(z_score, 1) AS z_score, is_super_weight, rule
FROM verified_super_weights
ORDER BY score_run_id, layer;

-- name: controls_matched_per_group
-- Did every matched control perturb as many weights as the treatment in each group of the ranking?
SELECT run_id, selection, seed, group_key, treatment_k, selected_k,
       treatment_k = selected_k AS matched
FROM condition_group_counts
WHERE role = 'control'
ORDER BY run_id DESC, group_key, selection, seed;

-- name: report_pages
-- Where is each report page, and how many runs (of which stages) does it show?
SELECT r.run_id, r.created_at, r.experiment, a.name AS page, a.bytes,
       count(p.parent_run_id) AS runs_shown,
       string_agg(DISTINCT p.role, ', ' ORDER BY p.role) AS stages_shown
FROM runs r
JOIN run_artifacts a ON a.run_id = r.run_id AND a.kind = 'report'
LEFT JOIN run_parents p ON p.run_id = r.run_id
WHERE r.stage = 'report' AND r.status = 'succeeded'
GROUP BY ALL
ORDER BY r.run_id DESC;
