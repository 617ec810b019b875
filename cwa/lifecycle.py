"""The run lifecycle every stage goes through.

1. Register the run (status ``running``) in a short write transaction.
2. Compute, with progress reported through the injected reporter; no store connection is held.
3. Write every result table, the run's metrics and its artifact list in ONE transaction and mark
   the run ``succeeded`` in that same transaction: a crash never leaves half-written results.
4. Mirror the run to MLflow (after DuckDB is written; a mirror failure is only a warning), by
   default in a detached process (:mod:`cwa.mlflow_background`; ``CWA_MLFLOW_MODE=inline``
   mirrors before returning).

An exception marks the run ``failed`` with the error text, Ctrl-C (KeyboardInterrupt) and
SIGTERM (what SLURM and Kubernetes send before killing a job) mark it ``interrupted``; both are
re-raised for the caller to handle (SIGTERM as :class:`Terminated`, a KeyboardInterrupt).

Failed or interrupted while computing: the run's partial artifacts are removed. Failed while
writing the results: nothing is removed; the results wait in ``artifacts/<run_id>/.pending``
and ``cwa runs recover RUN`` writes them (:mod:`cwa.recovery`). A run whose process vanished
(SIGKILL) is marked ``interrupted`` by the next registration, which also removes its partial
artifact folder unless it holds pending results.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwa import __version__
from cwa.errors import CwaError, InvalidInput
from cwa.progress import NULL_REPORTER, Reporter
from cwa.provenance import git_sha, library_versions
from cwa.recovery import _now, _to_arrow, write_pending  # noqa: F401  (write_pending re-exported)
from cwa.store.ids import new_run_id
from cwa.store.runs import RunRecord, fetch_run, insert_run, mark_stale_runs
from cwa.store.store import Store


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a stage ran: handled like Ctrl-C (the run becomes interrupted)."""


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
        _mark_stale(store, con)
        for parent, _role in record.parents:
            fetch_run(con, parent)  # raises RunNotFound
        insert_run(con, record)
    return record


def _mark_stale(store: Store, con: Any) -> None:
    """Mark runs of vanished processes interrupted and drop their partial artifact folders
    (kept when they hold pending results: those can still be recovered)."""
    from cwa.recovery import has_pending

    def running() -> set[str]:
        rows = con.execute(
            "SELECT run_id FROM runs WHERE status = 'running' AND hostname = ?",
            [socket.gethostname()],
        ).fetchall()
        return {row[0] for row in rows}

    before = running()
    if not before:
        return
    mark_stale_runs(con)
    for run_id in before - running():
        if not has_pending(store, run_id):
            shutil.rmtree(store.artifacts_dir(run_id), ignore_errors=True)


def _finish(
    store: Store,
    run_id: str,
    status: str,
    started: float,
    error: str | None,
    *,
    keep_artifacts: bool = False,
) -> None:
    # A run failed or interrupted while computing keeps no partial artifacts (e.g. a
    # half-written score file); one that failed while writing keeps them for recovery.
    if not keep_artifacts:
        shutil.rmtree(store.artifacts_dir(run_id), ignore_errors=True)
    with store.write() as con:
        con.execute(
            "UPDATE runs SET status = ?, finished_at = ?, duration_s = ?, error = ? "
            "WHERE run_id = ?",
            [status, _now(), time.monotonic() - started, error, run_id],
        )


def write_results(store: Store, ctx: RunContext, output: StageOutput, started: float) -> None:
    """All result rows, metrics, artifacts and the success mark in one transaction.

    The results are first saved under ``artifacts/<run_id>/.pending`` (removed once written), so
    a failing write loses nothing: ``cwa runs recover`` writes them later.
    """
    from cwa.recovery import PendingResults, discard_pending, save_pending

    tables = {}
    for table, rows in output.tables.items():
        if rows is None or (isinstance(rows, list) and not rows):
            continue
        arrow = _to_arrow(rows, ctx.run_id)
        if arrow.num_rows:
            tables[table] = arrow
    pending = PendingResults(
        run_id=ctx.run_id,
        tables=tables,
        metrics={k: None if v is None else float(v) for k, v in output.metrics.items()},
        config=ctx.request.config,
        model_ref=ctx.model_ref,
        model_fingerprint=ctx.model_fingerprint,
        device=ctx.device,
        duration_s=time.monotonic() - started,
        artifact_kinds=dict(ctx.artifact_kinds),
    )
    save_pending(store, pending)
    write_pending(store, pending)
    discard_pending(store, ctx.run_id)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, CwaError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _SigtermAsInterrupt:
    """While a stage runs in the main thread, SIGTERM raises :class:`Terminated`."""

    def __enter__(self) -> _SigtermAsInterrupt:
        self.previous: Any = None
        if threading.current_thread() is threading.main_thread():

            def handler(signum: int, frame: Any) -> None:
                raise Terminated("terminated by SIGTERM")

            self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def execute_stage(
    store: Store,
    request: StageRequest,
    compute: Callable[[RunContext], StageOutput],
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
) -> RunOutcome:
    """Run one stage through the full lifecycle and return its outcome.

    Exceptions from ``compute`` mark the run failed (artifacts removed) and propagate; a failure
    of the final write marks it failed with the reason and keeps the computed results for
    ``cwa runs recover``; KeyboardInterrupt and SIGTERM mark it interrupted and propagate.
    """
    reporter = reporter or NULL_REPORTER
    mirror = None
    if _mlflow_enabled(mlflow):
        from cwa.mlflow_background import mirror_mode

        mirror = mirror_mode()  # a bad CWA_MLFLOW_MODE is refused before the run exists
    record = register_run(store, request)
    ctx = RunContext(store, record.run_id, request, reporter)
    started = time.monotonic()
    with _SigtermAsInterrupt():
        try:
            output = compute(ctx)
            if not isinstance(output, StageOutput):
                raise TypeError(
                    f"stage {request.stage} returned {type(output).__name__}, not StageOutput"
                )
        except KeyboardInterrupt as exc:
            how = "SIGTERM" if isinstance(exc, Terminated) else "the user (Ctrl-C)"
            _finish(store, record.run_id, "interrupted", started, f"interrupted by {how}")
            raise
        except BaseException as exc:
            _finish(store, record.run_id, "failed", started, _error_text(exc))
            raise
        try:
            write_results(store, ctx, output, started)
        except BaseException as exc:
            _fail_write(store, record.run_id, started, exc)
            raise
    mlflow_run_id = None
    if mirror is not None:
        if mirror == "inline":
            from cwa.mlflow_mirror import mirror_run

            mlflow_run_id = mirror_run(store, record.run_id, reporter=reporter, fresh=True)
        else:  # a detached process mirrors it (MLflow's import costs seconds here)
            from cwa.mlflow_background import start_background_mirror

            start_background_mirror(store, record.run_id, reporter=reporter)
    return RunOutcome(
        run_id=record.run_id,
        stage=request.stage,
        status="succeeded",
        metrics=dict(output.metrics),
        artifacts_dir=store.artifacts_dir(record.run_id),
        mlflow_run_id=mlflow_run_id,
        value=output.value,
    )


def _fail_write(store: Store, run_id: str, started: float, exc: BaseException) -> None:
    """The final write failed: keep the results, mark the run failed when the store lets us."""
    from cwa.recovery import has_pending

    if has_pending(store, run_id):
        reason = (
            f"writing the results failed ({_error_text(exc)}); the computed results are kept "
            f"in {store.artifacts_dir(run_id)}: run `cwa runs recover {run_id}` once the store "
            "is free"
        )
    else:
        reason = f"writing the results failed ({_error_text(exc)})"
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    try:
        _finish(store, run_id, status, started, reason, keep_artifacts=True)
    except Exception:
        # The store is still unavailable: the run stays 'running' until the next registration
        # marks it interrupted (its pending results are kept and can be recovered).
        pass
