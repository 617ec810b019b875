-- Real pretrained models (issue 9): evaluation reuse key, per-item evaluation records,
-- the flipped-items view, and the super-weight activation profile (Yu et al. 2024).

-- Reuse key: hash of weights+config, tokenizer (files, special tokens, add-BOS behaviour),
-- dtype, attention implementation and the evaluation-engine version (cwa.evaluation.identity).
-- Rows written before this migration have NULL and are never reused.
ALTER TABLE evaluations ADD COLUMN eval_key VARCHAR;
-- What part of the text was scored, when not all of it (e.g. perplexity on the held-out tail
-- of the calibration source).
ALTER TABLE evaluations ADD COLUMN note VARCHAR;

-- One row per evaluated item (lm-eval --log_samples), for evaluate runs and for the baseline
-- (condition_id NULL) and every condition of a perturb run.
CREATE TABLE evaluation_items (
    run_id           VARCHAR NOT NULL,
    condition_id     VARCHAR,                    -- NULL: the unperturbed model
    task             VARCHAR NOT NULL,           -- hellaswag, lambada
    item_index       BIGINT NOT NULL,            -- 0-based index of the item in its source
    gold             INTEGER,                    -- HellaSwag: label; LAMBADA: 1 (the target)
    prediction       INTEGER,                    -- HellaSwag: argmax loglik; LAMBADA: 1 if greedy
    acc              DOUBLE,
    acc_norm         DOUBLE,                     -- HellaSwag only
    choice_loglik    DOUBLE[],                   -- HellaSwag: summed loglik of each ending
    target_loglik    DOUBLE,                     -- LAMBADA: summed loglik of the target word
    greedy           BOOLEAN,                    -- LAMBADA: every target token is the argmax
    task_config_hash VARCHAR NOT NULL
);

-- Per perturbation condition, the items whose prediction differs from the run's baseline.
CREATE VIEW flipped_items AS
SELECT
    c.run_id, c.condition_id, pc.selection, pc.method, pc.k, pc.seed, c.task, c.item_index,
    b.prediction AS baseline_prediction, c.prediction, b.acc AS baseline_acc, c.acc
FROM evaluation_items c
JOIN perturbation_conditions pc ON pc.run_id = c.run_id AND pc.condition_id = c.condition_id
JOIN evaluation_items b
    ON b.run_id = c.run_id AND b.condition_id IS NULL AND b.task = c.task
    AND b.item_index = c.item_index AND b.task_config_hash = c.task_config_hash
WHERE c.prediction IS DISTINCT FROM b.prediction;

-- The activation profile behind super-weight detection: per MLP down projection and detection
-- round, the largest |input| and |output| activation over calibration tokens, its channel, and
-- its ratio to the median over that projection's channels.
CREATE TABLE activation_profile (
    run_id             VARCHAR NOT NULL,
    layer              INTEGER,
    parameter          VARCHAR NOT NULL,
    max_input_abs      DOUBLE,
    input_channel      BIGINT,
    input_spike_ratio  DOUBLE,
    max_output_abs     DOUBLE,
    output_channel     BIGINT,
    output_spike_ratio DOUBLE,
    round              INTEGER NOT NULL          -- detection round, 1-based
);

-- Super-weight candidates now say in which round they were found and how far they spiked.
ALTER TABLE super_weights ADD COLUMN round INTEGER;
ALTER TABLE super_weights ADD COLUMN input_spike_ratio DOUBLE;
ALTER TABLE super_weights ADD COLUMN output_spike_ratio DOUBLE;
