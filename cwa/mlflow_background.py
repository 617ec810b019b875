"""The MLflow mirror in a detached process, so a stage returns as soon as DuckDB is written.

Importing MLflow and opening its SQLite store costs seconds and ~150 MB in the stage's
process, whatever the run holds (``mlflow`` imports pandas, fastapi and its GenAI modules;
the SQL store imports SQLAlchemy and alembic). With ``CWA_MLFLOW_MODE=background`` (the
default outside tests) a finished stage instead:

1. writes a marker ``<store>/mlflow-pending/<run_id>`` (the run is already in DuckDB), then
2. starts ``python -m cwa.mlflow_background <store>`` in its own session and returns.

The worker takes ``<store>/mlflow-pending/.lock`` (one mirror process per store at a time, so
runs are mirrored oldest first and a child's worker finds its parents' MLflow runs to link)
and mirrors every pending run through :func:`cwa.mlflow_mirror.mirror_run` -- the same content
as the inline mirror -- removing each marker once its run is mirrored. A worker that fails,
is killed or never started leaves its markers: the next stage's worker, ``cwa mlflow sync``
(which clears the markers of what it mirrors) or :func:`drain` catch up. Failures go to
``<store>/mlflow-pending/.mirror.log``. ``CWA_MLFLOW_MODE=inline`` mirrors inside the stage
(the behaviour tests rely on: the MLflow run exists when the call returns).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cwa.errors import InvalidInput
from cwa.pids import pid_alive
from cwa.progress import NULL_REPORTER, NullReporter, Reporter
from cwa.store.store import Store

PENDING_DIRNAME = "mlflow-pending"
_LOCK_NAME = ".lock"
_LOG_NAME = ".mirror.log"
MODES = ("background", "inline")


def mirror_mode() -> str:
    """``CWA_MLFLOW_MODE``: background (default) or inline."""
    mode = os.environ.get("CWA_MLFLOW_MODE", "background").strip().lower() or "background"
    if mode not in MODES:
        raise InvalidInput(f"CWA_MLFLOW_MODE={mode!r}; use background or inline")
    return mode


def pending_dir(store: Store) -> Path:
    return store.path / PENDING_DIRNAME


def pending_runs(store: Store) -> list[str]:
    """Runs whose MLflow mirror has not been written yet, oldest first."""
    folder = pending_dir(store)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def clear_pending(store: Store, run_ids: list[str] | set[str]) -> None:
    folder = pending_dir(store)
    for run_id in run_ids:
        (folder / run_id).unlink(missing_ok=True)


def worker_pid(store: Store, run_id: str) -> int | None:
    """The pid of the worker started for ``run_id`` (None once mirrored or never started)."""
    try:
        text = (pending_dir(store) / run_id).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def start_background_mirror(store: Store, run_id: str, reporter: Reporter | None = None) -> bool:
    """Queue ``run_id`` for the MLflow mirror and start a detached worker; False on failure
    (with a warning: the run is in DuckDB and stays queued for the next worker or sync)."""
    reporter = reporter or NULL_REPORTER
    folder = pending_dir(store)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / run_id
        marker.write_text("")  # queued before the worker exists: a failed start loses nothing
        env = dict(os.environ)
        # The worker imports this same cwa, however this process found it.
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        with (folder / _LOG_NAME).open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cwa.mlflow_background", str(store.path.resolve())],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,  # outlives this process; not killed by its Ctrl-C
                close_fds=True,
            )
        marker.write_text(f"{proc.pid}\n")
    except OSError as exc:
        reporter.warn(
            f"could not start the MLflow mirror for run {run_id} ({exc}); the run is safe in the "
            "DuckDB store; `cwa mlflow sync` mirrors it"
        )
        return False
    return True


@contextmanager
def mirror_lock(store: Store, timeout: float = 600.0) -> Iterator[None]:
    """Held while a process writes this store's MLflow mirror (workers and ``cwa mlflow sync``),
    so two of them never replace each other's copies of a run."""
    from filelock import FileLock

    folder = pending_dir(store)
    if not folder.is_dir():  # never mirrored in the background: no worker to wait for
        yield
        return
    with FileLock(str(folder / _LOCK_NAME), timeout=timeout):
        yield


def drain(store: Store, *, timeout: float = 600.0, reporter: Reporter | None = None) -> list[str]:
    """Mirror every pending run (waiting for a running worker first); returns those mirrored.

    Runs whose mirror fails stay pending (the failure is a warning, as inline)."""
    from filelock import Timeout

    from cwa.mlflow_mirror import mirror_run

    reporter = reporter or NULL_REPORTER
    if not pending_dir(store).is_dir():
        return []
    done: list[str] = []
    try:
        with mirror_lock(store, timeout):
            for run_id in pending_runs(store):
                if not _exists(store, run_id):  # deleted from the store meanwhile
                    clear_pending(store, [run_id])
                    continue
                # Not ``fresh``: a killed worker may have left a half-made copy to replace.
                if mirror_run(store, run_id, reporter=reporter) is not None:
                    clear_pending(store, [run_id])
                    done.append(run_id)
    except Timeout:
        reporter.warn(f"another MLflow mirror of {store.path} held its lock for {timeout:.0f} s")
    return done


def _exists(store: Store, run_id: str) -> bool:
    with store.read() as con:
        return con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] > 0


def wait_idle(store: Store, timeout: float = 600.0, poll: float = 0.05) -> bool:
    """Wait until no pending run has a live worker; True when idle within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [worker_pid(store, r) for r in pending_runs(store)]
        if not any(pid is not None and pid_alive(pid) for pid in pids):
            return True
        time.sleep(poll)
    return False


class _LogReporter(NullReporter):
    """Warnings of the detached worker, timestamped, to its log file (its stderr)."""

    def warn(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        sys.stderr.write(f"{stamp} pid {os.getpid()}: {message}\n")
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m cwa.mlflow_background STORE\n")
        return 2
    store = Store(args[0])
    drain(store, reporter=_LogReporter())
    return 0


if __name__ == "__main__":
    sys.exit(main())
