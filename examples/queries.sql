-- Research questions answered with plain SQL over a cwa store.
-- Run one with:  cwa sql "$(sed -n '/-- Q1/,/;/p' examples/queries.sql)"   or paste into `cwa sql`.

-- Q1: damage per selection of the newest perturb run (mean and spread over seeds).
SELECT selection, task, metric, count(*) AS n, avg(value) AS mean, stddev_samp(value) AS sd,
       any_value(baseline) AS baseline, avg(ratio) AS mean_ratio
FROM perturbation_effects
WHERE run_id = (SELECT max(run_id) FROM runs WHERE stage = 'perturb' AND status = 'succeeded')
  AND metric <> 'tokens'
GROUP BY ALL ORDER BY task, metric, selection;

-- Q2: which components hold the top-ranked weights of each rank run?
SELECT run_id, component, count(*) AS n_weights, round(avg(score), 6) AS mean_score
FROM ranked_weights GROUP BY ALL ORDER BY run_id, n_weights DESC;

-- Q3: sensitivity mass by layer and component for each score run.
SELECT s.run_id, r.config->>'metric' AS metric, s.layer, s.component, sum(s.sum) AS score_mass
FROM tensor_stats s JOIN runs r USING (run_id)
GROUP BY ALL ORDER BY s.run_id, score_mass DESC;

-- Q4: every run with its ancestors (lineage), newest first.
SELECT r.run_id, r.stage, r.status, l.ancestor_run_id, l.depth
FROM runs r LEFT JOIN run_lineage l USING (run_id) ORDER BY r.run_id DESC, l.depth;

-- Q5: top-100 overlap between score runs of different seeds (ranking stability),
--     for global rank runs with the same top-k.
WITH top AS (
    SELECT k.run_id, k.parameter, k.flat_index
    FROM ranked_weights k JOIN runs r USING (run_id)
    WHERE r.config->>'mode' = 'global' AND k.rank <= 100
)
SELECT a.run_id AS run_a, b.run_id AS run_b, count(*) / 100.0 AS overlap
FROM top a JOIN top b ON a.parameter = b.parameter AND a.flat_index = b.flat_index
WHERE a.run_id < b.run_id GROUP BY ALL ORDER BY ALL;
