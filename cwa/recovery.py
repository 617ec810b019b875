"""Writing a stage's results, and never losing them: pending results on disk, ``cwa runs recover``.

:func:`write_pending` is the one place results are written: every table, the metrics, the
artifact list and the success mark, in one transaction.

Before a stage's final write, :func:`save_pending` stores what the write will insert (every
result table as parquet, the metrics, the effective config and model provenance) under
``artifacts/<run_id>/.pending/``. When the write succeeds the folder is removed. When it fails
(the store stayed locked past the timeout, the disk filled up, ...) the run is marked ``failed``
with the reason, the artifacts (score files, pending tables) stay, and :func:`recover_run`
writes them later in one transaction, exactly as the stage would have, and marks the run
``succeeded``. A run killed outright (SIGKILL, power loss) is marked ``interrupted`` when the next
run registers; its partial artifact folder is then removed, unless it holds pending results.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput
from cwa.file_digest import file_sha256

if TYPE_CHECKING:
    from cwa.store.store import Store

PENDING_DIR = ".pending"


def _now() -> datetime:
    """Naive UTC now (the store keeps UTC timestamps without a zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


_STATE_FILE = "state.json"


@dataclass
class PendingResults:
    """Everything the final write of a run inserts, as saved on disk."""

    run_id: str
    tables: dict[str, Any]  # name -> pyarrow.Table
    metrics: dict[str, float | None]
    config: dict[str, Any]
    model_ref: str | None
    model_fingerprint: str | None
    device: str | None
    duration_s: float
    artifact_kinds: dict[str, str] = field(default_factory=dict)


def _to_arrow(rows: Any, run_id: str) -> Any:
    import polars as pl

    if isinstance(rows, pl.DataFrame):
        frame = rows
    elif isinstance(rows, list):
        frame = pl.DataFrame(rows, infer_schema_length=None)
    else:  # assume pyarrow.Table
        frame = pl.from_arrow(rows)
    if "run_id" not in frame.columns:
        frame = frame.with_columns(pl.lit(run_id).alias("run_id"))
    return frame.to_arrow()


def write_pending(store: Store, pending: Any) -> None:
    """Insert a run's :class:`~cwa.recovery.PendingResults` and mark it succeeded (one
    transaction; the artifact list excludes the pending folder itself)."""
    artifacts = []
    folder = store.artifacts_dir(pending.run_id)
    if folder.exists():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            if name.split("/")[0] == PENDING_DIR:
                continue
            kind = pending.artifact_kinds.get(name, _guess_kind(name))
            artifacts.append((pending.run_id, name, kind, path.stat().st_size, file_sha256(path)))
    with store.write() as con:
        for table, arrow in pending.tables.items():
            con.register("_cwa_rows", arrow)
            try:
                con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM _cwa_rows')
            finally:
                con.unregister("_cwa_rows")
        for name, value in pending.metrics.items():
            con.execute(
                "INSERT INTO run_metrics VALUES (?, ?, ?)",
                [pending.run_id, name, None if value is None else float(value)],
            )
        if artifacts:
            con.executemany("INSERT INTO run_artifacts VALUES (?, ?, ?, ?, ?)", artifacts)
        con.execute(
            "UPDATE runs SET status = 'succeeded', finished_at = ?, duration_s = ?, error = NULL, "
            "model_ref = ?, model_fingerprint = ?, device = ?, config = ? WHERE run_id = ?",
            [
                _now(),
                pending.duration_s,
                pending.model_ref,
                pending.model_fingerprint,
                pending.device,
                json.dumps(pending.config, sort_keys=True, default=str),
                pending.run_id,
            ],
        )


def _guess_kind(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return {
        ".safetensors": "scores",
        ".png": "plot",
        ".svg": "plot",
        ".pdf": "plot",
        ".html": "report",
        ".csv": "table",
        ".parquet": "table",
        ".json": "data",
    }.get(suffix, "other")


def pending_dir(store: Store, run_id: str) -> Path:
    return store.artifacts_dir(run_id) / PENDING_DIR


def has_pending(store: Store, run_id: str) -> bool:
    return (pending_dir(store, run_id) / _STATE_FILE).is_file()


def save_pending(store: Store, pending: PendingResults) -> Path:
    """Write the pending results (tables as parquet, the rest as JSON); returns the folder."""
    import pyarrow.parquet as pq

    folder = pending_dir(store, pending.run_id)
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "tables").mkdir(parents=True)
    names = []
    for i, (name, table) in enumerate(pending.tables.items()):
        pq.write_table(table, folder / "tables" / f"{i:03d}_{name}.parquet")
        names.append(name)
    state = {
        "run_id": pending.run_id,
        "tables": names,
        "metrics": pending.metrics,
        "config": pending.config,
        "model_ref": pending.model_ref,
        "model_fingerprint": pending.model_fingerprint,
        "device": pending.device,
        "duration_s": pending.duration_s,
        "artifact_kinds": pending.artifact_kinds,
    }
    # The state file last: its presence means the folder is complete.
    (folder / _STATE_FILE).write_text(json.dumps(state, default=str, sort_keys=True))
    return folder


def load_pending(store: Store, run_id: str) -> PendingResults:
    import pyarrow.parquet as pq

    folder = pending_dir(store, run_id)
    if not (folder / _STATE_FILE).is_file():
        raise InvalidInput(
            f"run {run_id} has no pending results in {folder}; nothing to recover (re-run the "
            "stage instead)"
        )
    state = json.loads((folder / _STATE_FILE).read_text())
    tables = {
        name: pq.read_table(folder / "tables" / f"{i:03d}_{name}.parquet")
        for i, name in enumerate(state["tables"])
    }
    return PendingResults(
        run_id=run_id,
        tables=tables,
        metrics=state["metrics"],
        config=state["config"],
        model_ref=state["model_ref"],
        model_fingerprint=state["model_fingerprint"],
        device=state["device"],
        duration_s=float(state["duration_s"]),
        artifact_kinds=dict(state.get("artifact_kinds") or {}),
    )


def discard_pending(store: Store, run_id: str) -> None:
    shutil.rmtree(pending_dir(store, run_id), ignore_errors=True)


def _still_running(run: Any) -> bool:
    """Whether the process of a 'running' run may still be alive (another host: assume so).

    A run whose final write failed because the store stayed locked could not be marked failed
    either; once its process has ended it is recoverable."""
    import os
    import socket

    if run.hostname != socket.gethostname() or run.pid is None:
        return True
    try:
        os.kill(int(run.pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_run(store: Store, ref: str, *, mlflow: bool | None = None, reporter: Any = None) -> Any:
    """Write the pending results of a failed/interrupted run and mark it succeeded.

    Returns the :class:`~cwa.lifecycle.RunOutcome`. Refused for a run that succeeded, is still
    running, or has no pending results.
    """
    from cwa.lifecycle import RunOutcome, _mlflow_enabled
    from cwa.store.runs import fetch_run, resolve_run_id

    with store.read() as con:
        run_id = resolve_run_id(con, ref, store_label=store.label)
        run = fetch_run(con, run_id)
    if run.status == "succeeded":
        raise InvalidInput(f"run {run_id} already succeeded; its results are in the store")
    if run.status == "running" and _still_running(run):
        raise InvalidInput(
            f"run {run_id} is still running (PID {run.pid} on {run.hostname}); wait for it to end"
        )
    pending = load_pending(store, run_id)
    write_pending(store, pending)
    discard_pending(store, run_id)
    mlflow_run_id = None
    if _mlflow_enabled(mlflow):
        from cwa.mlflow_mirror import mirror_run

        mlflow_run_id = mirror_run(store, run_id, reporter=reporter)
    return RunOutcome(
        run_id=run_id,
        stage=run.stage,
        status="succeeded",
        metrics={k: float(v) for k, v in pending.metrics.items() if v is not None},
        artifacts_dir=store.artifacts_dir(run_id),
        mlflow_run_id=mlflow_run_id,
    )
