"""The run lifecycle every stage goes through.

1. Register the run (status ``running``) in a short write transaction.
2. Compute, with progress reported through the injected reporter; no store connection is held.
3. Write every result table, the run's metrics and its artifact list in ONE transaction and mark
   the run ``succeeded`` in that same transaction: a crash never leaves half-written results.
4. Mirror the run to MLflow (after DuckDB is written; a mirror failure is only a warning).

An exception marks the run ``failed`` with the error text, Ctrl-C (KeyboardInterrupt) marks it
``interrupted``; both are re-raised for the caller to handle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cwa import __version__
from cwa.errors import CwaError, InvalidInput
from cwa.progress import NULL_REPORTER, Reporter
from cwa.provenance import git_sha, library_versions
from cwa.store.ids import new_run_id
from cwa.store.runs import RunRecord, fetch_run, insert_run, mark_stale_runs
from cwa.store.store import Store


@dataclass
class StageRequest:
    """What a stage is asked to do: enough to register the run before computing."""

    stage: str
    config: dict[str, Any]
    experiment: str = "default"
    parents: Sequence[tuple[str, str]] = ()  # (parent run id, role)
    model_ref: str | None = None
    seed: int | None = None
    command: str | None = None


@dataclass
class StageOutput:
    """What a stage's computation produced, written in one transaction."""

    tables: dict[str, Any] = field(default_factory=dict)  # name -> rows / polars / arrow
    metrics: dict[str, float] = field(default_factory=dict)
    value: Any = None  # anything the caller wants back (not stored)


@dataclass
class RunOutcome:
    run_id: str
    stage: str
    status: str
    metrics: dict[str, float]
    artifacts_dir: Path
    mlflow_run_id: str | None
    value: Any = None


class RunContext:
    """Handed to a stage's compute function: run id, artifacts folder, reporter, provenance."""

    def __init__(self, store: Store, run_id: str, request: StageRequest, reporter: Reporter):
        self.store = store
        self.run_id = run_id
        self.request = request
        self.reporter = reporter
        self.model_ref = request.model_ref
        self.model_fingerprint: str | None = None
        self.device: str | None = None
        self.artifact_kinds: dict[str, str] = {}

    @property
    def artifacts_dir(self) -> Path:
        path = self.store.artifacts_dir(self.run_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def artifact_path(self, name: str, kind: str = "other") -> Path:
        """A path inside this run's artifacts folder, registered with its kind."""
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise InvalidInput(f"artifact name {name!r} must be a relative path inside the run")
        self.artifact_kinds[name] = kind
        path = self.artifacts_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def record_config(self, **values: Any) -> None:
        """Add effective settings discovered while computing (stored with the results)."""
        self.request.config.update(values)

    def set_model(self, ref: str | None, fingerprint: str | None, device: str | None) -> None:
        self.model_ref = ref
        self.model_fingerprint = fingerprint
        self.device = device


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _mlflow_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return os.environ.get("CWA_MLFLOW", "1").strip().lower() not in ("0", "false", "no", "off")


def register_run(store: Store, request: StageRequest) -> RunRecord:
    """Insert the run row (status running) and its lineage; validates parents exist."""
    if not request.stage:
        raise InvalidInput("a run needs a stage name")
    record = RunRecord(
        run_id=new_run_id(),
        stage=request.stage,
        experiment=request.experiment or "default",
        status="running",
        model_ref=request.model_ref,
        model_fingerprint=None,
        seed=request.seed,
        config=request.config,
        created_at=_now(),
        finished_at=None,
        duration_s=None,
        error=None,
        cwa_version=__version__,
        versions=library_versions(),
        device=None,
        git_sha=git_sha(),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        command=request.command,
        mlflow_run_id=None,
        parents=list(request.parents),
    )
    with store.write() as con:
        mark_stale_runs(con)
        for parent, _role in record.parents:
            fetch_run(con, parent)  # raises RunNotFound
        insert_run(con, record)
    return record


def _finish(store: Store, run_id: str, status: str, started: float, error: str | None) -> None:
    # A failed or interrupted run keeps no partial artifacts (e.g. a half-written score file).
    shutil.rmtree(store.artifacts_dir(run_id), ignore_errors=True)
    with store.write() as con:
        con.execute(
            "UPDATE runs SET status = ?, finished_at = ?, duration_s = ?, error = ? "
            "WHERE run_id = ?",
            [status, _now(), time.monotonic() - started, error, run_id],
        )


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


def write_results(store: Store, ctx: RunContext, output: StageOutput, started: float) -> None:
    """All result rows, metrics, artifacts and the success mark in one transaction."""
    artifacts = []
    folder = store.artifacts_dir(ctx.run_id)
    if folder.exists():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            artifacts.append(
                (
                    ctx.run_id,
                    name,
                    ctx.artifact_kinds.get(name, _guess_kind(name)),
                    path.stat().st_size,
                    _sha256(path),
                )
            )
    with store.write() as con:
        for table, rows in output.tables.items():
            if rows is None or (isinstance(rows, list) and not rows):
                continue
            arrow = _to_arrow(rows, ctx.run_id)
            if arrow.num_rows == 0:
                continue
            con.register("_cwa_rows", arrow)
            try:
                con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM _cwa_rows')
            finally:
                con.unregister("_cwa_rows")
        for name, value in output.metrics.items():
            con.execute(
                "INSERT INTO run_metrics VALUES (?, ?, ?)",
                [ctx.run_id, name, None if value is None else float(value)],
            )
        if artifacts:
            con.executemany("INSERT INTO run_artifacts VALUES (?, ?, ?, ?, ?)", artifacts)
        con.execute(
            "UPDATE runs SET status = 'succeeded', finished_at = ?, duration_s = ?, "
            "model_ref = ?, model_fingerprint = ?, device = ?, config = ? WHERE run_id = ?",
            [
                _now(),
                time.monotonic() - started,
                ctx.model_ref,
                ctx.model_fingerprint,
                ctx.device,
                json.dumps(ctx.request.config, sort_keys=True, default=str),
                ctx.run_id,
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, CwaError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def execute_stage(
    store: Store,
    request: StageRequest,
    compute: Callable[[RunContext], StageOutput],
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
) -> RunOutcome:
    """Run one stage through the full lifecycle and return its outcome.

    Exceptions from ``compute`` (or from writing results) mark the run failed and propagate;
    KeyboardInterrupt marks it interrupted and propagates.
    """
    reporter = reporter or NULL_REPORTER
    record = register_run(store, request)
    ctx = RunContext(store, record.run_id, request, reporter)
    started = time.monotonic()
    try:
        output = compute(ctx)
        if not isinstance(output, StageOutput):
            raise TypeError(
                f"stage {request.stage} returned {type(output).__name__}, not StageOutput"
            )
        write_results(store, ctx, output, started)
    except KeyboardInterrupt:
        _finish(store, record.run_id, "interrupted", started, "interrupted by the user (Ctrl-C)")
        raise
    except BaseException as exc:
        _finish(store, record.run_id, "failed", started, _error_text(exc))
        raise
    mlflow_run_id = None
    if _mlflow_enabled(mlflow):
        from cwa.mlflow_mirror import mirror_run

        mlflow_run_id = mirror_run(store, record.run_id, reporter=reporter)
    return RunOutcome(
        run_id=record.run_id,
        stage=request.stage,
        status="succeeded",
        metrics=dict(output.metrics),
        artifacts_dir=store.artifacts_dir(record.run_id),
        mlflow_run_id=mlflow_run_id,
        value=output.value,
    )
