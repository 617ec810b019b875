-- cwa analyze, continued: clusters, super-weights and effects analyzers, plus views for the
-- common questions. Every row carries run_id = the analyze run.

-- clusters: one row per cluster (cluster_id -1 = DBSCAN noise).
CREATE TABLE analysis_clusters (
    run_id          VARCHAR NOT NULL,
    score_run_id    VARCHAR NOT NULL,     -- the first score run (its top-N and sample were clustered)
    algorithm       VARCHAR NOT NULL,     -- kmeans, minibatch_kmeans, dbscan
    cluster_id      INTEGER NOT NULL,
    size            BIGINT NOT NULL,      -- clustered weights in the cluster
    n_top           BIGINT NOT NULL,      -- of them in the score run's global top-N
    silhouette      DOUBLE,               -- mean silhouette of the members (NULL: not computed)
    mean_score      DOUBLE,               -- mean raw score (first score run)
    mean_abs_weight DOUBLE,               -- mean |w| (NULL when weights were not used)
    mean_depth      DOUBLE,               -- mean (layer + 0.5) / n_layers
    top_component   VARCHAR,              -- most frequent component of the members
    top_layer       INTEGER,              -- most frequent layer of the members
    is_noise        BOOLEAN NOT NULL,
    PRIMARY KEY (run_id, cluster_id)
);

-- clusters: centroid per cluster and feature (long form).
CREATE TABLE analysis_cluster_centroids (
    run_id       VARCHAR NOT NULL,
    cluster_id   INTEGER NOT NULL,
    feature      VARCHAR NOT NULL,        -- log_score_0, log_score_1, abs_weight, depth, component=mlp_up, ...
    value        DOUBLE,                  -- mean of the members' raw feature
    value_scaled DOUBLE,                  -- mean in the clustering space (z-scored features)
    PRIMARY KEY (run_id, cluster_id, feature)
);

-- clusters: every clustered weight and its cluster (what `--treatment cluster:ID` perturbs).
CREATE TABLE analysis_cluster_members (
    run_id     VARCHAR NOT NULL,
    cluster_id INTEGER NOT NULL,
    parameter  VARCHAR NOT NULL,
    flat_index BIGINT NOT NULL,
    layer      INTEGER,
    component  VARCHAR,
    in_top_n   BOOLEAN NOT NULL,
    score      DOUBLE,                    -- raw score in the first score run
    abs_weight DOUBLE,
    PRIMARY KEY (run_id, parameter, flat_index)
);

-- super-weights: the per-layer activation profile of the MLP down projections.
CREATE TABLE analysis_super_weight_profile (
    run_id             VARCHAR NOT NULL,
    score_run_id       VARCHAR NOT NULL,
    layer              INTEGER,
    parameter          VARCHAR NOT NULL,
    round              INTEGER,           -- detection round (NULL: the run recorded none)
    max_input_abs      DOUBLE,            -- largest |input| of the down projection
    input_channel      BIGINT,
    input_spike_ratio  DOUBLE,            -- max / median over channels (activation_profile; NULL if absent)
    max_output_abs     DOUBLE,
    output_channel     BIGINT,
    output_spike_ratio DOUBLE,
    layer_input_ratio  DOUBLE,            -- max_input_abs / median over layers of max_input_abs
    layer_output_ratio DOUBLE,            -- max_output_abs / median over layers of max_output_abs
    source             VARCHAR NOT NULL   -- 'activation_profile' or 'candidates'
);

-- super-weights: each candidate, and with --verify the ablation evidence and the verdict.
CREATE TABLE analysis_super_weights (
    run_id            VARCHAR NOT NULL,
    score_run_id      VARCHAR NOT NULL,
    layer             INTEGER,
    parameter         VARCHAR NOT NULL,
    row_index         BIGINT NOT NULL,
    column_index      BIGINT NOT NULL,
    flat_index        BIGINT NOT NULL,
    round             INTEGER,
    input_channel     BIGINT,
    output_channel    BIGINT,
    input_activation  DOUBLE,
    output_activation DOUBLE,
    weight_value      DOUBLE,
    verified          BOOLEAN NOT NULL,   -- false: candidates only (no --verify)
    task              VARCHAR,            -- 'perplexity'
    baseline          DOUBLE,             -- perplexity of the unmodified model
    zeroed            DOUBLE,             -- perplexity with this weight alone set to 0
    ratio             DOUBLE,             -- zeroed / baseline
    control_mean      DOUBLE,             -- mean perplexity zeroing one random weight of the tensor
    control_sd        DOUBLE,
    control_max       DOUBLE,
    n_controls        INTEGER,
    z_score           DOUBLE,             -- (zeroed - control_mean) / control_sd
    is_super_weight   BOOLEAN,            -- the rule below, NULL when not verified
    rule              VARCHAR,            -- the rule with its thresholds, e.g. 'ratio>=1.5 & z>=3 & zeroed>control_max'
    PRIMARY KEY (run_id, parameter, flat_index)
);

-- super-weights --verify: each control ablation (one random weight of the same tensor, seeded).
CREATE TABLE analysis_super_weight_controls (
    run_id          VARCHAR NOT NULL,
    parameter       VARCHAR NOT NULL,
    candidate_index BIGINT NOT NULL,      -- flat index of the candidate it is a control for
    seed            BIGINT NOT NULL,
    flat_index      BIGINT NOT NULL,      -- the random weight zeroed
    weight_value    DOUBLE,
    zeroed          DOUBLE,               -- perplexity with that weight set to 0
    PRIMARY KEY (run_id, parameter, candidate_index, seed)
);

-- effects: treatment vs each matched control, per perturb run, method, scale, k, task, metric.
CREATE TABLE analysis_effects (
    run_id                    VARCHAR NOT NULL,
    perturb_run_id            VARCHAR NOT NULL,
    method                    VARCHAR NOT NULL,
    scale                     DOUBLE,
    bit                       INTEGER,
    k                         BIGINT NOT NULL,   -- weights selected (treatment = control)
    task                      VARCHAR NOT NULL,
    metric                    VARCHAR NOT NULL,
    task_config_hash          VARCHAR NOT NULL,
    treatment                 VARCHAR NOT NULL,  -- top_k or cluster:ID
    control                   VARCHAR NOT NULL,  -- random_k, bottom_k, ...
    n_treatment               INTEGER NOT NULL,  -- treatment values (seeds of a stochastic method)
    n_control                 INTEGER NOT NULL,  -- control values (seeds)
    baseline                  DOUBLE,
    treatment_mean            DOUBLE,
    treatment_sd              DOUBLE,
    control_mean              DOUBLE,
    control_sd                DOUBLE,
    difference                DOUBLE,            -- treatment_mean - control_mean
    ratio                     DOUBLE,            -- treatment_mean / control_mean
    ci_low                    DOUBLE,            -- t-interval of the difference (Welch with >1 treatment value)
    ci_high                   DOUBLE,
    ci_level                  DOUBLE,
    z                         DOUBLE,            -- difference / control_sd
    frac_controls_worse       DOUBLE,            -- share of control values at least as damaged
    treatment_damage          DOUBLE,            -- treatment_mean - baseline
    control_damage            DOUBLE,
    damage_per_weight         DOUBLE,            -- treatment_damage / k
    control_damage_per_weight DOUBLE
);

-- effects: k-curve (x = k at a fixed scale) and scale-curve (x = scale at a fixed k) points.
CREATE TABLE analysis_effect_curves (
    run_id            VARCHAR NOT NULL,
    curve             VARCHAR NOT NULL,   -- 'k' or 'scale'
    perturb_run_id    VARCHAR NOT NULL,
    selection         VARCHAR NOT NULL,
    role              VARCHAR,            -- treatment, control, bound
    method            VARCHAR NOT NULL,
    bit               INTEGER,
    task              VARCHAR NOT NULL,
    metric            VARCHAR NOT NULL,
    task_config_hash  VARCHAR NOT NULL,
    fixed_value       DOUBLE,             -- the scale of a k-curve, the k of a scale-curve
    x                 DOUBLE NOT NULL,
    n                 BIGINT NOT NULL,    -- values averaged (seeds)
    mean              DOUBLE,
    sd                DOUBLE,
    baseline          DOUBLE,
    damage            DOUBLE,             -- mean - baseline
    damage_per_weight DOUBLE              -- damage / k
);

-- effects: per condition and task, how many items changed correctness (per-item records only).
CREATE TABLE analysis_effect_flips (
    run_id           VARCHAR NOT NULL,
    perturb_run_id   VARCHAR NOT NULL,
    condition_id     VARCHAR NOT NULL,
    selection        VARCHAR NOT NULL,
    k                BIGINT,
    seed             BIGINT,
    task             VARCHAR NOT NULL,
    task_config_hash VARCHAR NOT NULL,
    n_items          BIGINT NOT NULL,
    n_flipped        BIGINT NOT NULL,     -- acc differs from the unperturbed model's
    correct_to_wrong BIGINT NOT NULL,
    wrong_to_correct BIGINT NOT NULL,
    PRIMARY KEY (run_id, perturb_run_id, condition_id, task, task_config_hash)
);

-- effects: the flipped items themselves.
CREATE TABLE analysis_flipped_items (
    run_id              VARCHAR NOT NULL,
    perturb_run_id      VARCHAR NOT NULL,
    condition_id        VARCHAR NOT NULL,
    selection           VARCHAR NOT NULL,
    task                VARCHAR NOT NULL,
    task_config_hash    VARCHAR NOT NULL,
    item_index          BIGINT NOT NULL,
    gold                INTEGER,
    baseline_prediction INTEGER,
    prediction          INTEGER,
    baseline_acc        DOUBLE,
    acc                 DOUBLE
);

-- Clustered perturbations next to their cluster: damage per weight of each perturbed cluster
-- and of its matched random_k controls (same run, method, scale, k, task, metric). The cluster
-- comes from the perturb run's 'clusters' parent (the analyze run) and the id after the last
-- ':' or '/' of the selection label (cluster:3 or cluster:RUN/3).
CREATE VIEW cluster_perturbation_damage AS
WITH treated AS (
    SELECT e.run_id AS perturb_run_id, p.parent_run_id AS clusters_run_id,
           CAST(regexp_extract(e.selection, '(-?[0-9]+)$', 1) AS INTEGER) AS cluster_id,
           e.selection, e.method, e.scale, e.k, e.task, e.metric, e.baseline, e.value, e.delta,
           e.ratio
    FROM perturbation_effects e
    JOIN run_parents p ON p.run_id = e.run_id AND p.role = 'clusters'
    WHERE e.selection LIKE 'cluster:%' AND e.metric <> 'tokens'
), controls AS (
    SELECT run_id AS perturb_run_id, method, scale, k, task, metric,
           avg(delta) AS control_delta, stddev_samp(delta) AS control_delta_sd,
           count(*) AS n_control
    FROM perturbation_effects WHERE selection = 'random_k'
    GROUP BY ALL
)
SELECT t.perturb_run_id, t.clusters_run_id, t.cluster_id, c.size AS cluster_size,
       c.top_component, c.top_layer, c.mean_score, c.silhouette, t.method, t.scale, t.k,
       t.task, t.metric, t.baseline, t.value, t.delta, t.ratio,
       t.delta / t.k AS damage_per_weight,
       ctl.control_delta, ctl.control_delta_sd, ctl.n_control,
       ctl.control_delta / t.k AS control_damage_per_weight
FROM treated t
JOIN analysis_clusters c ON c.run_id = t.clusters_run_id AND c.cluster_id = t.cluster_id
LEFT JOIN controls ctl
    ON ctl.perturb_run_id = t.perturb_run_id AND ctl.method = t.method
    AND ctl.scale IS NOT DISTINCT FROM t.scale AND ctl.k = t.k AND ctl.task = t.task
    AND ctl.metric = t.metric;

-- The verdict per super-weight candidate of the newest verifying analysis of each score run.
CREATE VIEW verified_super_weights AS
SELECT s.*
FROM analysis_super_weights s
WHERE s.verified AND s.run_id = (
    SELECT max(o.run_id) FROM analysis_super_weights o
    WHERE o.score_run_id = s.score_run_id AND o.verified
);
