-- Runs: one row per stage invocation, with provenance, lineage, metrics and artifacts.
-- Released migrations are never edited; add a new NNNN_description.sql instead.

CREATE TABLE runs (
    run_id            VARCHAR PRIMARY KEY,          -- ULID: time-sortable
    stage             VARCHAR NOT NULL,             -- score, rank, perturb, evaluate, analyze, report, ...
    experiment        VARCHAR NOT NULL,             -- experiment/group label (one MLflow experiment each)
    status            VARCHAR NOT NULL
        CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted')),
    model_ref         VARCHAR,                      -- name or path as given
    model_fingerprint VARCHAR,                      -- hash of config + weights
    seed              BIGINT,
    config            JSON NOT NULL,                -- the full stage config
    created_at        TIMESTAMP NOT NULL,           -- UTC
    finished_at       TIMESTAMP,                    -- UTC
    duration_s        DOUBLE,
    error             VARCHAR,                      -- failure or interruption text
    cwa_version       VARCHAR NOT NULL,
    versions          JSON,                         -- python and library versions
    device            VARCHAR,
    git_sha           VARCHAR,
    hostname          VARCHAR,
    pid               INTEGER,
    command           VARCHAR,                      -- command line, when run from the CLI
    mlflow_run_id     VARCHAR
);

CREATE TABLE run_parents (
    run_id        VARCHAR NOT NULL,
    parent_run_id VARCHAR NOT NULL,
    role          VARCHAR NOT NULL DEFAULT 'input',  -- e.g. 'scores', 'ranking', 'baseline'
    PRIMARY KEY (run_id, parent_run_id)
);

CREATE TABLE run_metrics (
    run_id VARCHAR NOT NULL,
    name   VARCHAR NOT NULL,
    value  DOUBLE,
    PRIMARY KEY (run_id, name)
);

CREATE TABLE run_artifacts (
    run_id  VARCHAR NOT NULL,
    name    VARCHAR NOT NULL,                       -- path relative to artifacts/<run_id>/
    kind    VARCHAR NOT NULL,                       -- scores, plot, report, table, other
    bytes   BIGINT NOT NULL,
    sha256  VARCHAR,
    PRIMARY KEY (run_id, name)
);

-- Every (run, ancestor) pair with its distance: lineage in plain SQL.
CREATE VIEW run_lineage AS
WITH RECURSIVE ancestry(run_id, ancestor_run_id, depth) AS (
    SELECT run_id, parent_run_id, 1 FROM run_parents
    UNION ALL
    SELECT a.run_id, p.parent_run_id, a.depth + 1
    FROM ancestry a JOIN run_parents p ON p.run_id = a.ancestor_run_id
)
SELECT run_id, ancestor_run_id, min(depth) AS depth FROM ancestry GROUP BY run_id, ancestor_run_id;
