-- cwa analyze: typed result tables of the profile, stability, drift and correlation analyzers,
-- plus views for the common questions. Every row carries run_id = the analyze run.

-- Rows of plugin analyzers whose tables are not part of the schema (one JSON object per row).
CREATE TABLE analysis_rows (
    run_id     VARCHAR NOT NULL,
    analyzer   VARCHAR NOT NULL,
    table_name VARCHAR NOT NULL,
    row_index  BIGINT NOT NULL,
    data       JSON NOT NULL,
    PRIMARY KEY (run_id, table_name, row_index)
);

-- profile: score distribution per group of weights of one score run.
CREATE TABLE analysis_profile (
    run_id          VARCHAR NOT NULL,
    score_run_id    VARCHAR NOT NULL,
    level           VARCHAR NOT NULL,   -- model, tensor, layer, component, layer_component, head, kv_group
    group_key       VARCHAR NOT NULL,   -- e.g. 'all', parameter name, 'layer=3', 'attn_q', 'layer=3,attn_q', 'layer=3,attn_k,head=1', 'layer=3,kv_group=1'
    layer           INTEGER,            -- NULL outside the layer stack or for model/component levels
    component       VARCHAR,            -- comma-joined for a fused tensor at level 'tensor'
    head            INTEGER,            -- query head (attn_q/attn_o) or kv head (attn_k/attn_v)
    kv_group        INTEGER,            -- the kv head a query head reads; the kv head itself for k/v
    parameter       VARCHAR,            -- level 'tensor' only
    n               BIGINT NOT NULL,    -- scored weights in the group (each weight counted once)
    mass            DOUBLE,             -- sum of |score|
    share           DOUBLE,             -- mass / the model's mass
    mean            DOUBLE,             -- mass / n (mean |score|)
    min             DOUBLE,
    p50             DOUBLE,
    p90             DOUBLE,
    p99             DOUBLE,
    max             DOUBLE,
    gini            DOUBLE,             -- Gini coefficient of |score| in the group
    top1pct_share   DOUBLE,             -- share of the group's mass held by its top ceil(1%) weights
    share_of_layer  DOUBLE,             -- level layer_component: mass / the layer's mass
    density_ratio   DOUBLE,             -- level layer_component: mean / the layer's mean
    rank_in_layer   INTEGER,            -- level layer_component: 1 = highest mean in the layer
    topk_count      BIGINT,             -- weights of the rank run's top-k in the group (NULL: no rank run)
    topk_share      DOUBLE,             -- topk_count / k
    method          VARCHAR NOT NULL,   -- 'exact' or 'histogram' (how quantiles/Gini were obtained)
    PRIMARY KEY (run_id, score_run_id, level, group_key)
);

-- profile: depth pattern of the mean |score| per layer, for the model and for each component.
CREATE TABLE analysis_depth_trend (
    run_id        VARCHAR NOT NULL,
    score_run_id  VARCHAR NOT NULL,
    scope         VARCHAR NOT NULL,     -- 'model' or a component
    n_layers      INTEGER NOT NULL,
    pattern       VARCHAR NOT NULL,     -- increasing, decreasing, peak_middle, valley, flat, irregular
    slope         DOUBLE,               -- linear fit: change of (value / mean value) per layer
    intercept     DOUBLE,
    r2_linear     DOUBLE,
    curvature     DOUBLE,               -- quadratic coefficient (x = layer / (n_layers - 1))
    r2_quadratic  DOUBLE,
    vertex_layer  DOUBLE,               -- layer of the quadratic's extremum
    relative_range DOUBLE,              -- (max - min) / mean of the per-layer values
    PRIMARY KEY (run_id, score_run_id, scope)
);

-- stability: agreement of the top-k weights of two score runs (one row per pair, group and k).
CREATE TABLE analysis_stability (
    run_id       VARCHAR NOT NULL,
    run_a        VARCHAR NOT NULL,
    run_b        VARCHAR NOT NULL,
    scope        VARCHAR NOT NULL,      -- global, layer, component
    group_key    VARCHAR NOT NULL,      -- 'all', 'layer=3', 'attn_q', ...
    k            BIGINT NOT NULL,
    k_label      VARCHAR NOT NULL,      -- as asked: '100' or '0.1%'
    overlap      BIGINT NOT NULL,       -- |top_k(a) ∩ top_k(b)|
    overlap_frac DOUBLE NOT NULL,       -- overlap / k
    jaccard      DOUBLE NOT NULL,
    rbo          DOUBLE,                -- extrapolated rank-biased overlap, tie-aware
    rbo_p        DOUBLE NOT NULL,       -- RBO persistence
    spearman     DOUBLE,                -- on the union of the two top-k sets (scores of both runs)
    kendall      DOUBLE,                -- tau-b on the same union
    n_union      BIGINT NOT NULL,
    PRIMARY KEY (run_id, run_a, run_b, scope, group_key, k)
);

-- stability: each statistic averaged over the pairs, with a confidence interval.
CREATE TABLE analysis_stability_summary (
    run_id     VARCHAR NOT NULL,
    scope      VARCHAR NOT NULL,
    group_key  VARCHAR NOT NULL,
    k          BIGINT NOT NULL,
    k_label    VARCHAR NOT NULL,
    statistic  VARCHAR NOT NULL,        -- overlap_frac, jaccard, rbo, spearman, kendall
    n_runs     INTEGER NOT NULL,
    n_pairs    INTEGER NOT NULL,
    mean       DOUBLE,
    std        DOUBLE,                  -- over pairs
    min        DOUBLE,
    max        DOUBLE,
    ci_low     DOUBLE,
    ci_high    DOUBLE,
    ci_level   DOUBLE,
    ci_method  VARCHAR,                 -- 'bootstrap_runs' (resampling runs) or NULL (one pair)
    PRIMARY KEY (run_id, scope, group_key, k, statistic)
);

-- drift: how far each tensor's score distribution and critical region moved between two runs.
CREATE TABLE analysis_drift (
    run_id          VARCHAR NOT NULL,
    run_a           VARCHAR NOT NULL,
    run_b           VARCHAR NOT NULL,
    parameter       VARCHAR NOT NULL,   -- '*' for the whole model
    layer           INTEGER,
    component       VARCHAR,
    numel           BIGINT NOT NULL,
    ks              DOUBLE,             -- Kolmogorov-Smirnov statistic of |score| (histogram bin edges)
    wasserstein     DOUBLE,             -- mean |q_a - q_b| over 99 percentiles
    wasserstein_rel DOUBLE,             -- wasserstein / mean |score| of run a
    mean_a          DOUBLE,
    mean_b          DOUBLE,
    share_a         DOUBLE,             -- the tensor's share of run a's mass
    share_b         DOUBLE,
    topk            BIGINT,             -- k used for the tensor's top-k overlap
    topk_overlap    DOUBLE,             -- |top_k(a) ∩ top_k(b)| / k within the tensor
    moved           BOOLEAN NOT NULL,   -- topk_overlap < threshold or ks > ks_threshold
    drift_rank      INTEGER,            -- 1 = moved most (lowest top-k overlap, then highest KS)
    PRIMARY KEY (run_id, parameter)
);

-- correlation: matrices stored long-form.
CREATE TABLE analysis_correlation (
    run_id       VARCHAR NOT NULL,
    kind         VARCHAR NOT NULL,      -- 'metric' (run x run) or 'layer' (layer x layer)
    scope        VARCHAR NOT NULL,      -- metric: global or tensor; layer: components or heads
    group_key    VARCHAR NOT NULL,      -- metric: 'all' or parameter; layer: the score run id
    row_key      VARCHAR NOT NULL,      -- metric: run a; layer: 'layer=i'
    col_key      VARCHAR NOT NULL,      -- metric: run b; layer: 'layer=j'
    statistic    VARCHAR NOT NULL,      -- spearman, kendall, pearson, topk_overlap
    value        DOUBLE,
    n            BIGINT,                -- sample size or k
    PRIMARY KEY (run_id, kind, scope, group_key, row_key, col_key, statistic)
);

-- Which layers keep their top-k weights across runs (seeds, data, metrics)?
CREATE VIEW analysis_stable_layers AS
SELECT s.run_id, s.group_key, TRY_CAST(regexp_extract(s.group_key, 'layer=(\d+)', 1) AS INTEGER) AS layer,
       s.k, s.k_label, s.n_pairs, s.mean AS jaccard, s.ci_low, s.ci_high,
       rank() OVER (PARTITION BY s.run_id, s.k ORDER BY s.mean DESC) AS stability_rank
FROM analysis_stability_summary s
WHERE s.scope = 'layer' AND s.statistic = 'jaccard';

-- Do two metrics agree on which weights matter (global rank correlation, top-k overlap)?
CREATE VIEW analysis_metric_agreement AS
SELECT c.run_id, c.row_key AS run_a, json_extract_string(ra.config, '$.metric') AS metric_a,
       c.col_key AS run_b, json_extract_string(rb.config, '$.metric') AS metric_b,
       c.statistic, c.value, c.n
FROM analysis_correlation c
JOIN runs ra ON ra.run_id = c.row_key
JOIN runs rb ON rb.run_id = c.col_key
WHERE c.kind = 'metric' AND c.scope = 'global';

-- Attention q/k/v/o and MLP up/gate/down side by side within each layer.
CREATE VIEW analysis_layer_components AS
SELECT run_id, score_run_id, layer, component, n, mass, share_of_layer, mean, density_ratio,
       rank_in_layer, gini, top1pct_share
FROM analysis_profile
WHERE level = 'layer_component';

-- Tensors whose critical region moved most between two runs.
CREATE VIEW analysis_drifted_tensors AS
SELECT run_id, run_a, run_b, drift_rank, parameter, layer, component, topk_overlap, ks,
       wasserstein_rel, moved
FROM analysis_drift
WHERE parameter <> '*';
