-- Evaluation results: plain models (condition_id NULL) and perturbation conditions.

CREATE TABLE evaluations (
    run_id            VARCHAR NOT NULL,
    condition_id      VARCHAR,                   -- NULL: the unperturbed model
    task              VARCHAR NOT NULL,          -- perplexity, hellaswag, lambada, ...
    metric            VARCHAR NOT NULL,          -- acc, acc_norm, perplexity, nll, ...
    value             DOUBLE,
    stderr            DOUBLE,
    n                 BIGINT,                    -- items or tokens the value is over
    task_config_hash  VARCHAR NOT NULL,          -- identifies task + data + limit + seed + settings
    model_fingerprint VARCHAR,
    reused_from       VARCHAR                    -- run id whose stored result was reused, if any
);
