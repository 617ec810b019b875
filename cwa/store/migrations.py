"""Schema migrations for the experiment store.

Migrations are SQL files named ``NNNN_description.sql``. They ship inside the wheel as
``cwa/_migrations`` (from the repository's top-level ``migrations/`` folder) and are read with
``importlib.resources``. Each pending migration runs in its own ``BEGIN ... COMMIT`` together with
its bookkeeping row (name, checksum), so a failing migration leaves nothing of itself behind.
Listing what is applied or pending never writes. A store that has migrations this cwa does not
know (written by a newer version) is refused, and so is a store whose applied migration no longer
matches the shipped file (a released migration was edited).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from cwa.errors import MigrationError, StoreVersionError

if TYPE_CHECKING:
    import duckdb

BOOKKEEPING_TABLE = "cwa_migrations"
_NAME_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    number: int
    name: str  # file name, e.g. "0001_runs.sql"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AppliedMigration:
    number: int
    name: str
    checksum: str
    applied_at: datetime


def migrations_dir() -> Path:
    """Where this installation's migration files live (wheel resource or source checkout)."""
    packaged = resources.files("cwa") / "_migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    # Source checkout / editable install: the top-level migrations/ folder.
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if checkout.is_dir():
        return checkout
    raise MigrationError("cwa's migration files are missing from this installation; reinstall cwa")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """All migrations in ``directory`` (default: the shipped ones), ordered by number."""
    directory = directory or migrations_dir()
    found: list[Migration] = []
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _NAME_RE.match(path.name)
        if not match:
            raise MigrationError(
                f"migration file {path.name!r} is not named NNNN_description.sql; rename it"
            )
        found.append(Migration(int(match.group(1)), path.name, path.read_text("utf-8")))
    numbers = [m.number for m in found]
    if len(set(numbers)) != len(numbers):
        raise MigrationError(f"two migration files share a number in {directory}")
    return found


def _has_bookkeeping(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
        [BOOKKEEPING_TABLE],
    ).fetchone()
    return bool(row and row[0])


def applied_migrations(con: duckdb.DuckDBPyConnection) -> list[AppliedMigration]:
    """Migrations recorded in the store, in order. Read-only."""
    if not _has_bookkeeping(con):
        return []
    rows = con.execute(
        f"SELECT number, name, checksum, applied_at FROM {BOOKKEEPING_TABLE} ORDER BY number"
    ).fetchall()
    return [AppliedMigration(*row) for row in rows]


def check_compatible(
    applied: list[AppliedMigration], known: list[Migration], store_label: str
) -> None:
    """Refuse stores written by a newer schema, or whose released migrations were edited."""
    by_name = {m.name: m for m in known}
    latest_known = max((m.number for m in known), default=0)
    for row in applied:
        if row.name not in by_name:
            if row.number > latest_known:
                raise StoreVersionError(
                    f"store {store_label} has schema {row.number:04d} ({row.name}), newer than "
                    f"this cwa knows ({latest_known:04d}); upgrade cwa (pip install -U cwa) or "
                    "use another --store"
                )
            raise StoreVersionError(
                f"store {store_label} has migration {row.name} which this cwa does not ship; "
                "it was written by a different cwa build: use the matching cwa or another --store"
            )
        if by_name[row.name].checksum != row.checksum:
            raise StoreVersionError(
                f"migration {row.name} has changed since it was applied to {store_label} "
                f"(checksum {row.checksum[:12]} in the store, "
                f"{by_name[row.name].checksum[:12]} on disk); released migrations must never be "
                "edited: restore the file and put the change in a new migration"
            )


def pending_migrations(
    con: duckdb.DuckDBPyConnection, known: list[Migration], store_label: str
) -> list[Migration]:
    """Known migrations not yet applied (after checking compatibility). Read-only."""
    applied = applied_migrations(con)
    check_compatible(applied, known, store_label)
    done = {a.name for a in applied}
    return [m for m in known if m.name not in done]


def apply_migrations(
    con: duckdb.DuckDBPyConnection, known: list[Migration], store_label: str
) -> list[Migration]:
    """Apply every pending migration, each in its own transaction. Returns those applied."""
    con.execute("BEGIN")
    try:
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {BOOKKEEPING_TABLE} ("
            "number INTEGER PRIMARY KEY, name VARCHAR NOT NULL UNIQUE, "
            "checksum VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)"
        )
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    pending = pending_migrations(con, known, store_label)
    for migration in pending:
        con.execute("BEGIN")
        try:
            con.execute(migration.sql)
            con.execute(
                f"INSERT INTO {BOOKKEEPING_TABLE} VALUES (?, ?, ?, ?)",
                [
                    migration.number,
                    migration.name,
                    migration.checksum,
                    datetime.now(UTC).replace(tzinfo=None),
                ],
            )
            con.execute("COMMIT")
        except Exception as exc:
            con.execute("ROLLBACK")
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise MigrationError(
                f"migration {migration.name} failed and was rolled back ({first_line}); "
                "the store is unchanged by it: fix the migration or report a bug"
            ) from exc
    return pending


def schema_version(applied: list[AppliedMigration]) -> int:
    return max((a.number for a in applied), default=0)
