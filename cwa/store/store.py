"""The experiment store: a directory with ``cwa.duckdb``, per-run artifact folders and,
by default, the MLflow mirror database.

DuckDB allows one writing process per file, and a process holding the file read-write also
blocks readers in other processes. So the store never keeps a connection open: every read or
write opens a connection, does its short transaction and closes it. When another process holds
the file, opening is retried with backoff for a bounded time (``CWA_LOCK_TIMEOUT`` seconds,
default 60), then :class:`~cwa.errors.StoreLocked` names the process holding the lock.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cwa.errors import InvalidInput, StoreCorrupt, StoreLocked, StoreNotFound
from cwa.store import migrations as mig

if TYPE_CHECKING:
    import duckdb

DEFAULT_STORE = "cwa_store"
DB_FILENAME = "cwa.duckdb"
ARTIFACTS_DIRNAME = "artifacts"
MLFLOW_DB_FILENAME = "mlflow.db"

_LOCK_HOLDER_RE = re.compile(r"[Cc]onflicting lock is held in (.+?\(PID \d+\))")


def default_store_path() -> Path:
    return Path(os.environ.get("CWA_STORE") or DEFAULT_STORE)


def _lock_timeout() -> float:
    try:
        return float(os.environ.get("CWA_LOCK_TIMEOUT", "60"))
    except ValueError as exc:
        raise InvalidInput("CWA_LOCK_TIMEOUT must be a number of seconds") from exc


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc)
    return "lock" in text.lower() and ("Conflicting lock" in text or "Could not set lock" in text)


@dataclass(frozen=True)
class StoreInfo:
    path: Path
    db_path: Path
    exists: bool
    schema_version: int
    applied: list[mig.AppliedMigration]
    pending: list[str]
    db_bytes: int
    artifacts_bytes: int
    mlflow_bytes: int
    n_runs: int


class Store:
    """Handle on a store directory. Cheap to create; opens DuckDB only per transaction."""

    def __init__(self, path: str | Path | None = None, *, migrations_dir: Path | None = None):
        self.path = Path(path) if path is not None else default_store_path()
        self._migrations_dir = migrations_dir

    # -- layout ----------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.path / DB_FILENAME

    @property
    def artifacts_root(self) -> Path:
        return self.path / ARTIFACTS_DIRNAME

    def artifacts_dir(self, run_id: str) -> Path:
        return self.artifacts_root / run_id

    @property
    def mlflow_db_path(self) -> Path:
        return self.path / MLFLOW_DB_FILENAME

    @property
    def label(self) -> str:
        return str(self.path)

    def known_migrations(self) -> list[mig.Migration]:
        return mig.load_migrations(self._migrations_dir)

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | None = None, *, migrations_dir: Path | None = None) -> Store:
        """Open (creating if needed) a store for writing and apply pending migrations."""
        store = cls(path, migrations_dir=migrations_dir)
        store._ensure_dir()
        store.migrate()
        return store

    @classmethod
    def open_existing(
        cls, path: str | Path | None = None, *, migrations_dir: Path | None = None
    ) -> Store:
        """Open a store for reading; it must already exist (read-only commands never create one)."""
        store = cls(path, migrations_dir=migrations_dir)
        if not store.path.exists():
            raise StoreNotFound(
                f"no store at {store.path}; run a stage first (e.g. cwa demo) or pass "
                "--store / set CWA_STORE to an existing store"
            )
        if not store.path.is_dir():
            raise InvalidInput(f"store path {store.path} is a file; --store takes a directory")
        if not store.db_path.exists():
            raise StoreNotFound(
                f"{store.path} has no {DB_FILENAME}; it is not a cwa store (pass --store to "
                "the right directory)"
            )
        with store.read() as con:
            mig.pending_migrations(con, store.known_migrations(), store.label)
        return store

    def _ensure_dir(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInput(f"store path {self.path} is a file; --store takes a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self.artifacts_root.mkdir(exist_ok=True)

    def migrate(self) -> list[mig.Migration]:
        """Apply pending migrations; returns the ones applied (empty when up to date)."""
        known = self.known_migrations()
        with self._connect(read_only=False) as con:
            pending = mig.pending_migrations(con, known, self.label)
            if not pending:
                return []
            return mig.apply_migrations(con, known, self.label)

    # -- connections -----------------------------------------------------------------
    @contextmanager
    def _connect(self, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        import duckdb

        deadline = time.monotonic() + _lock_timeout()
        delay = 0.02
        while True:
            try:
                con = duckdb.connect(str(self.db_path), read_only=read_only)
                break
            except duckdb.Error as exc:
                if _is_lock_error(exc):
                    if time.monotonic() >= deadline:
                        holder = _LOCK_HOLDER_RE.search(str(exc))
                        who = holder.group(1).strip() if holder else "another process"
                        raise StoreLocked(
                            f"store {self.db_path} is locked by {who} for longer than "
                            f"{_lock_timeout():g}s; wait for it to finish or raise "
                            "CWA_LOCK_TIMEOUT"
                        ) from exc
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 1.0)
                    continue
                if not self.db_path.exists() and read_only:
                    raise StoreNotFound(f"no database at {self.db_path}") from exc
                raise StoreCorrupt(
                    f"cannot open {self.db_path} as a DuckDB database "
                    f"({str(exc).splitlines()[0]}); point --store at a cwa store directory"
                ) from exc
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-only connection."""
        with self._connect(read_only=True) as con:
            yield con

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short write transaction: committed on success, rolled back on any exception."""
        with self._connect(read_only=False) as con:
            con.execute("BEGIN")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- status ----------------------------------------------------------------------
    def info(self) -> StoreInfo:
        """Path, schema version, applied and pending migrations, sizes. Never writes."""
        exists = self.db_path.exists()
        applied: list[mig.AppliedMigration] = []
        pending: list[str] = [m.name for m in self.known_migrations()]
        n_runs = 0
        if exists:
            with self.read() as con:
                applied = mig.applied_migrations(con)
                pending = [
                    m.name for m in mig.pending_migrations(con, self.known_migrations(), self.label)
                ]
                if any(a.name.endswith("_runs.sql") for a in applied):
                    n_runs = int(con.execute("SELECT count(*) FROM runs").fetchone()[0])
        return StoreInfo(
            path=self.path,
            db_path=self.db_path,
            exists=exists,
            schema_version=mig.schema_version(applied),
            applied=applied,
            pending=pending,
            db_bytes=_size(self.db_path) + _size(self.db_path.with_suffix(".duckdb.wal")),
            artifacts_bytes=_tree_size(self.artifacts_root),
            mlflow_bytes=_size(self.mlflow_db_path),
            n_runs=n_runs,
        )


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
