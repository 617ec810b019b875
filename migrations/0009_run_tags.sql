-- User tags and notes on runs (`cwa runs tag RUN KEY=VALUE`, `--note`), mirrored to MLflow.
-- The note is the tag with key 'note'. Released migrations are never edited; add a new file.

CREATE TABLE run_tags (
    run_id     VARCHAR NOT NULL,
    key        VARCHAR NOT NULL,
    value      VARCHAR NOT NULL,
    updated_at TIMESTAMP NOT NULL,                 -- UTC
    PRIMARY KEY (run_id, key)
);
