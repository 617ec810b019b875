"""Migration runner: blank store, idempotence, failure atomicity, newer/edited schemas."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pytest

from cwa.errors import MigrationError, StoreVersionError
from cwa.store import Store
from cwa.store import migrations as mig

REPO = Path(__file__).resolve().parents[1]


def _tables(db: Path) -> set[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {
            r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        }
    finally:
        con.close()


def _copy_migrations(tmp_path: Path) -> Path:
    target = tmp_path / "migrations"
    shutil.copytree(REPO / "migrations", target)
    return target


def test_blank_store_reaches_final_schema(store_path: Path) -> None:
    store = Store.open(store_path)
    known = mig.load_migrations()
    info = store.info()
    assert info.schema_version == known[-1].number
    assert [a.name for a in info.applied] == [m.name for m in known]
    assert info.pending == []
    assert {
        "runs",
        "run_parents",
        "run_metrics",
        "run_artifacts",
        "run_lineage",
        "cwa_migrations",
    } <= _tables(store.db_path)
    # checksums recorded equal the shipped files'
    assert [a.checksum for a in info.applied] == [m.checksum for m in known]


def test_applying_twice_is_a_noop(store_path: Path) -> None:
    store = Store.open(store_path)
    before = store.info().applied
    assert store.migrate() == []
    assert Store.open(store_path).info().applied == before


def test_failing_migration_leaves_nothing_of_itself(tmp_path: Path) -> None:
    migrations = _copy_migrations(tmp_path)
    (migrations / "9001_good.sql").write_text("CREATE TABLE good_one (x INTEGER);")
    (migrations / "9002_bad.sql").write_text(
        "CREATE TABLE half_done (x INTEGER);\nINSERT INTO half_done VALUES (1);\n"
        "SELECT * FROM no_such_table;"
    )
    with pytest.raises(MigrationError, match="9002_bad.sql failed and was rolled back"):
        Store.open(tmp_path / "s", migrations_dir=migrations)
    tables = _tables(tmp_path / "s" / "cwa.duckdb")
    assert "good_one" in tables  # earlier migration kept
    assert "half_done" not in tables  # the failing one left nothing
    assert Store(tmp_path / "s", migrations_dir=migrations).info().pending == ["9002_bad.sql"]
    con = duckdb.connect(str(tmp_path / "s" / "cwa.duckdb"), read_only=True)
    names = [
        r[0] for r in con.execute("SELECT name FROM cwa_migrations ORDER BY number").fetchall()
    ]
    con.close()
    assert names[-1] == "9001_good.sql"


def test_newer_schema_is_refused_with_actionable_message(tmp_path: Path, cli) -> None:
    store = Store.open(tmp_path / "s")
    con = duckdb.connect(str(store.db_path))
    con.execute("INSERT INTO cwa_migrations VALUES (9999, '9999_future.sql', 'abc', now())")
    con.close()
    with pytest.raises(StoreVersionError, match="newer than this cwa knows.*upgrade cwa"):
        Store.open(tmp_path / "s")
    result = cli("--store", str(tmp_path / "s"), "runs", "list")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: store ")
    assert "upgrade cwa" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_edited_released_migration_is_detected(tmp_path: Path) -> None:
    migrations = _copy_migrations(tmp_path)
    Store.open(tmp_path / "s", migrations_dir=migrations)
    first = sorted(migrations.glob("0001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- sneaky edit\n")
    with pytest.raises(StoreVersionError, match="has changed since it was applied"):
        Store.open(tmp_path / "s", migrations_dir=migrations)


def test_migration_files_are_well_formed() -> None:
    known = mig.load_migrations()
    assert [m.number for m in known] == list(range(1, len(known) + 1))
    for m in known:
        assert "BEGIN" not in m.sql.upper().split("--")[0], "the runner owns transactions"


def test_bad_migration_name_is_an_error(tmp_path: Path) -> None:
    migrations = tmp_path / "m"
    migrations.mkdir()
    (migrations / "1_nope.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="NNNN_description.sql"):
        mig.load_migrations(migrations)
