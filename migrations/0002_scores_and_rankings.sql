-- Score runs (per-tensor statistics, super-weight candidates) and rank runs (ranked weights).

CREATE TABLE tensor_stats (
    run_id             VARCHAR NOT NULL,
    parameter          VARCHAR NOT NULL,
    layer              INTEGER,                  -- NULL for embeddings, final norm, lm_head
    component          VARCHAR NOT NULL,         -- comma-joined for fused tensors (attn_q,attn_k,attn_v)
    numel              BIGINT NOT NULL,
    mean               DOUBLE,
    std                DOUBLE,
    min                DOUBLE,
    max                DOUBLE,
    p50                DOUBLE,
    p90                DOUBLE,
    p99                DOUBLE,
    p99_9              DOUBLE,
    sum                DOUBLE,
    top1pct_mass_share DOUBLE,                   -- share of the tensor's score mass in its top 1%
    zeros              BIGINT,
    nonfinite          BIGINT,
    PRIMARY KEY (run_id, parameter)
);

CREATE TABLE super_weights (
    run_id            VARCHAR NOT NULL,
    layer             INTEGER NOT NULL,
    parameter         VARCHAR NOT NULL,
    row_index         BIGINT NOT NULL,           -- index into the weight tensor (dim 0)
    column_index      BIGINT NOT NULL,           -- index into the weight tensor (dim 1)
    input_channel     BIGINT NOT NULL,           -- input channel with the activation spike
    output_channel    BIGINT NOT NULL,           -- output channel with the activation spike
    input_activation  DOUBLE,                    -- max |input| at that channel over calibration tokens
    output_activation DOUBLE,                    -- max |output| at that channel
    weight_value      DOUBLE
);

CREATE TABLE ranked_weights (
    run_id       VARCHAR NOT NULL,
    group_key    VARCHAR NOT NULL,               -- 'all' for global; layer/tensor/head/component key otherwise
    rank         BIGINT NOT NULL,                -- 1-based within the group
    parameter    VARCHAR NOT NULL,
    flat_index   BIGINT NOT NULL,
    row_index    BIGINT,
    column_index BIGINT,
    layer        INTEGER,
    component    VARCHAR,
    head         INTEGER,
    score        DOUBLE,
    weight_value DOUBLE,
    PRIMARY KEY (run_id, group_key, rank)
);
