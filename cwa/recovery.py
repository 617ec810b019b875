"""Computed results are never lost: pending results on disk, and ``cwa runs recover``.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput

if TYPE_CHECKING:
    from cwa.store.store import Store

PENDING_DIR = ".pending"
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
    from cwa.lifecycle import RunOutcome, _mlflow_enabled, write_pending
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
