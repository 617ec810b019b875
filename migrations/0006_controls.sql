-- Matched controls: per-group counts of every perturbation condition, and each condition's role.

-- treatment (the selection controls are compared with), control (matched to the treatment per
-- group of the rank mode) or bound (unmatched, e.g. all_k). NULL for runs written before 0006.
ALTER TABLE perturbation_conditions ADD COLUMN role VARCHAR;

CREATE TABLE condition_groups (
    run_id       VARCHAR NOT NULL,
    condition_id VARCHAR NOT NULL,
    group_key    VARCHAR NOT NULL,   -- group label of the rank mode ('all', 'layer=3', ...)
    k            BIGINT NOT NULL,    -- weights this condition perturbed in that group
    PRIMARY KEY (run_id, condition_id, group_key)
);

-- Every condition's per-group count next to the treatment's count for the same k:
-- for matched controls treatment_k = selected_k in every row.
CREATE VIEW condition_group_counts AS
WITH treatment AS (
    SELECT DISTINCT pc.run_id, pc.k, g.group_key, g.k AS treatment_k
    FROM perturbation_conditions pc
    JOIN condition_groups g ON g.run_id = pc.run_id AND g.condition_id = pc.condition_id
    WHERE pc.role = 'treatment'
)
SELECT
    pc.run_id, pc.condition_id, pc.selection, pc.role, pc.method, pc.scale, pc.seed,
    pc.k AS condition_k, g.group_key, t.treatment_k, g.k AS selected_k
FROM perturbation_conditions pc
JOIN condition_groups g ON g.run_id = pc.run_id AND g.condition_id = pc.condition_id
LEFT JOIN treatment t
    ON t.run_id = pc.run_id AND t.k = pc.k AND t.group_key = g.group_key;
