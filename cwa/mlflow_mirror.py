"""Mirror of runs into MLflow, for comparison in the MLflow UI.

DuckDB is the source of truth and is always written first; this module copies a finished run
into MLflow (one MLflow experiment per store experiment label): params from the flattened config,
tags (stage, cwa run id, parents, seed, model), metrics and artifacts. The tracking URI is
``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<store>/mlflow.db`` with artifacts under
``<store>/mlflow-artifacts``. Any MLflow failure becomes a warning through the reporter and never
loses data. Artifacts larger than ``CWA_MLFLOW_MAX_ARTIFACT_MB`` (default 100) are not copied; a
tag records their path in the store instead.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import UTC
from pathlib import Path
from typing import Any

from cwa.progress import NULL_REPORTER, Reporter
from cwa.store.runs import fetch_run
from cwa.store.store import Store

_MAX_PARAM_LEN = 6000
_BATCH = 100


_MLFLOW_NAME_RE = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_name(name: str) -> str:
    """A metric/param name MLflow accepts (alphanumerics, _ - . space : /)."""
    return _MLFLOW_NAME_RE.sub("_", name)


def _epoch_ms(value: Any) -> int | None:
    # Stored timestamps are naive UTC; .timestamp() on a naive value would assume local time.
    return None if value is None else int(value.replace(tzinfo=UTC).timestamp() * 1000)


def tracking_uri(store: Store) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store.mlflow_db_path.resolve()}"


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"} with values as strings (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            text = value if isinstance(value, str) else repr(value) if value is None else str(value)
            flat[name] = text[:_MAX_PARAM_LEN]
    return flat


def _max_artifact_bytes() -> int:
    try:
        return int(float(os.environ.get("CWA_MLFLOW_MAX_ARTIFACT_MB", "100")) * 1024 * 1024)
    except ValueError:
        return 100 * 1024 * 1024


def mirror_run(store: Store, run_id: str, *, reporter: Reporter | None = None) -> str | None:
    """Copy a run to MLflow; returns the MLflow run id, or None (with a warning) on failure."""
    reporter = reporter or NULL_REPORTER
    try:
        mlflow_run_id = _mirror(store, run_id)
    except Exception as exc:  # the mirror must never lose or block data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reporter.warn(
            f"MLflow mirror failed for run {run_id} ({first}); the run is safe in the DuckDB "
            "store (disable the mirror with --no-mlflow / CWA_MLFLOW=0)"
        )
        return None
    return mlflow_run_id


def _mirror(store: Store, run_id: str) -> str:
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    with store.read() as con:
        run = fetch_run(con, run_id)
        metrics = con.execute(
            "SELECT name, value FROM run_metrics WHERE run_id = ? ORDER BY name", [run_id]
        ).fetchall()
        artifacts = [
            r[0]
            for r in con.execute(
                "SELECT name FROM run_artifacts WHERE run_id = ? ORDER BY name", [run_id]
            ).fetchall()
        ]

    uri = tracking_uri(store)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(run.experiment)
    if experiment is None:
        location = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            location = (store.path / "mlflow-artifacts" / run.experiment).resolve().as_uri()
        experiment_id = client.create_experiment(run.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id

    start_ms = _epoch_ms(run.created_at)
    tags = {
        "cwa.stage": run.stage,
        "cwa.run_id": run.run_id,
        "cwa.parents": ",".join(p for p, _ in run.parents),
        "cwa.seed": "" if run.seed is None else str(run.seed),
        "cwa.model": run.model_ref or "",
        "cwa.model_fingerprint": run.model_fingerprint or "",
        "cwa.status": run.status,
        "cwa.store": str(store.path.resolve()),
        "cwa.git_sha": run.git_sha or "",
        "cwa.version": run.cwa_version,
        "mlflow.runName": f"{run.stage}-{run.run_id[-8:].lower()}",
    }
    mlrun = client.create_run(experiment_id, start_time=start_ms, tags=tags)
    mlflow_run_id = mlrun.info.run_id
    try:
        params = [Param(mlflow_name(k), v) for k, v in sorted(flatten_config(run.config).items())]
        metric_objs = [
            Metric(mlflow_name(name), float(value), start_ms or 0, 0)
            for name, value in metrics
            if value is not None
        ]
        for i in range(0, max(len(params), len(metric_objs), 1), _BATCH):
            client.log_batch(
                mlflow_run_id, metrics=metric_objs[i : i + _BATCH], params=params[i : i + _BATCH]
            )
        limit = _max_artifact_bytes()
        folder = store.artifacts_dir(run_id)
        skipped = []
        for name in artifacts:
            path = folder / name
            if not path.is_file():
                continue
            if path.stat().st_size > limit:
                skipped.append(name)
                continue
            parent = str(Path(name).parent)
            client.log_artifact(mlflow_run_id, str(path), None if parent == "." else parent)
        if skipped:
            client.set_tag(mlflow_run_id, "cwa.large_artifacts_in_store", ",".join(skipped)[:5000])
    except Exception:
        # Do not leave a half-mirrored run looking like it is still running.
        client.set_terminated(mlflow_run_id, status="FAILED")
        raise
    end_ms = _epoch_ms(run.finished_at)
    client.set_terminated(mlflow_run_id, status="FINISHED", end_time=end_ms)
    with store.write() as con:
        con.execute("UPDATE runs SET mlflow_run_id = ? WHERE run_id = ?", [mlflow_run_id, run_id])
    return mlflow_run_id
