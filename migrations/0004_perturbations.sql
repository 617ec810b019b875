-- Perturbation conditions and their effect next to the unperturbed baseline.

CREATE TABLE perturbation_conditions (
    run_id          VARCHAR NOT NULL,
    condition_id    VARCHAR NOT NULL,
    selection       VARCHAR NOT NULL,            -- top_k, random_k, bottom_k, all_k
    method          VARCHAR NOT NULL,            -- zero, sign_flip, scale, gaussian_noise, bit_flip
    scale           DOUBLE,
    bit             INTEGER,
    k               BIGINT NOT NULL,             -- weights selected
    seed            BIGINT,
    n_changed       BIGINT NOT NULL,             -- weights whose bits actually changed
    scope           JSON,                        -- layers/components/heads the selection drew from
    checksum_before VARCHAR,                     -- touched tensors before the perturbation
    checksum_after  VARCHAR,                     -- the same after restoration (must be equal)
    restored        BOOLEAN NOT NULL,
    PRIMARY KEY (run_id, condition_id)
);

CREATE VIEW perturbation_effects AS
SELECT
    c.run_id, c.condition_id, pc.selection, pc.method, pc.scale, pc.bit, pc.k, pc.seed,
    pc.n_changed, c.task, c.metric, c.value, b.value AS baseline,
    c.value - b.value AS delta,
    CASE WHEN b.value = 0 THEN NULL ELSE c.value / b.value END AS ratio
FROM evaluations c
JOIN perturbation_conditions pc ON pc.run_id = c.run_id AND pc.condition_id = c.condition_id
JOIN evaluations b
    ON b.run_id = c.run_id AND b.condition_id IS NULL AND b.task = c.task
    AND b.metric = c.metric AND b.task_config_hash = c.task_config_hash;
