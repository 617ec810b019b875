"""Moving runs between stores (``cwa runs export`` / ``cwa db import``) and ``cwa db gc``.

An export folder holds ``tables/<table>.parquet`` (the runs' rows from every table with a
``run_id`` column, ``runs`` and ``run_parents`` included), ``artifacts/<run_id>/`` (copies of the
run folders) and ``provenance.json`` (who exported what, from which store, with which schema, and
the sha256 of every artifact). Import checks that the export's schema is exactly the target
store's, verifies every artifact's sha256, skips runs the target already has (and says which),
copies artifacts, then writes all rows in one transaction.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cwa import __version__
from cwa.errors import InvalidInput, StoreVersionError
from cwa.file_digest import file_sha256
from cwa.store import migrations as mig
from cwa.store.runs import resolve_run_id
from cwa.store.store import Store

PROVENANCE = "provenance.json"
FORMAT = "cwa-export/1"


@dataclass
class ExportResult:
    folder: Path
    run_ids: list[str]
    rows: dict[str, int]
    artifact_bytes: int


@dataclass
class ImportResult:
    imported: list[str]
    skipped: list[str]  # already in the target store
    rows: dict[str, int]
    missing_parents: list[str] = field(default_factory=list)


def _run_tables(con: Any) -> list[str]:
    rows = con.execute(
        "SELECT DISTINCT c.table_name FROM information_schema.columns c "
        "JOIN information_schema.tables t ON t.table_name = c.table_name "
        "WHERE c.column_name = 'run_id' AND t.table_type = 'BASE TABLE' ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def _schema(con: Any) -> list[dict[str, str]]:
    return [{"name": a.name, "checksum": a.checksum} for a in mig.applied_migrations(con)]


def export_runs(
    store: Store, refs: list[str], to: Path, *, with_ancestors: bool = False
) -> ExportResult:
    """Write the runs (and optionally their ancestors) to a new folder ``to``."""
    if not refs:
        raise InvalidInput("name at least one run to export")
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise InvalidInput(f"--to {to} exists and is not an empty folder; pick a new folder")
    with store.read() as con:
        ids = [resolve_run_id(con, r, store_label=store.label) for r in refs]
        running = con.execute(
            "SELECT run_id FROM runs WHERE status = 'running' AND list_contains(?, run_id)", [ids]
        ).fetchall()
        if running:
            raise InvalidInput(f"run {running[0][0]} is still running; export it when it ends")
        if with_ancestors:
            ids += [
                r[0]
                for r in con.execute(
                    "SELECT DISTINCT ancestor_run_id FROM run_lineage "
                    "WHERE list_contains(?, run_id)",
                    [ids],
                ).fetchall()
            ]
        ids = sorted(set(ids))
        frames = {}
        for table in _run_tables(con):
            frame = con.sql(
                f'SELECT * FROM "{table}" WHERE list_contains($ids, run_id)', params={"ids": ids}
            ).pl()
            if frame.height:
                frames[table] = frame
        schema = _schema(con)
        artifacts = con.execute(
            "SELECT run_id, name, bytes, sha256 FROM run_artifacts WHERE list_contains(?, run_id) "
            "ORDER BY run_id, name",
            [ids],
        ).fetchall()
    (to / "tables").mkdir(parents=True, exist_ok=True)
    for table, frame in frames.items():
        frame.write_parquet(to / "tables" / f"{table}.parquet")
    total = 0
    for run_id in ids:
        source = store.artifacts_dir(run_id)
        if source.is_dir():
            shutil.copytree(source, to / "artifacts" / run_id)
    for _run_id, _name, size, _sha in artifacts:
        total += int(size or 0)
    provenance = {
        "format": FORMAT,
        "exported_at": datetime.now(UTC).isoformat(),
        "cwa_version": __version__,
        "host": socket.gethostname(),
        "user": os.environ.get("USER", ""),
        "source_store": str(store.path.resolve()),
        "schema": schema,
        "runs": ids,
        "requested": refs,
        "tables": {t: f.height for t, f in frames.items()},
        "artifacts": [
            {"run_id": r, "name": n, "bytes": b, "sha256": s} for r, n, b, s in artifacts
        ],
    }
    (to / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return ExportResult(to, ids, {t: f.height for t, f in frames.items()}, total)


def _read_export(folder: Path) -> dict[str, Any]:
    path = folder / PROVENANCE
    if not folder.is_dir():
        raise InvalidInput(f"{folder} is not a folder; pass a folder written by cwa runs export")
    if not path.is_file():
        raise InvalidInput(f"{folder} has no {PROVENANCE}; it is not a cwa export")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path} is not valid JSON ({exc.msg}); re-export the runs") from exc
    if data.get("format") != FORMAT:
        raise InvalidInput(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
    return data


def _check_schema(exported: list[dict[str, str]], target: list[dict[str, str]], label: str) -> None:
    if exported == target:
        return
    names_e = [m["name"] for m in exported]
    names_t = [m["name"] for m in target]
    newer = [n for n in names_t if n not in names_e]
    if newer and set(names_e) <= set(names_t):
        raise StoreVersionError(
            f"store {label} has a newer schema than the export (it also has {', '.join(newer)}); "
            "import into a store of the export's cwa version, or re-export with this cwa"
        )
    raise StoreVersionError(
        f"the export's schema ({names_e[-1] if names_e else 'none'}) differs from store {label} "
        f"({names_t[-1] if names_t else 'none'}); use the cwa version that wrote the export"
    )


def _verify_artifacts(folder: Path, listed: list[dict[str, Any]], ids: set[str]) -> None:
    for item in listed:
        if item["run_id"] not in ids:
            continue
        path = folder / "artifacts" / item["run_id"] / item["name"]
        if not path.is_file():
            raise InvalidInput(f"export is missing artifact {item['run_id']}/{item['name']}")
        if item.get("sha256") and file_sha256(path) != item["sha256"]:
            raise InvalidInput(
                f"artifact {item['run_id']}/{item['name']} does not match its sha256; the export "
                "is damaged: export again"
            )


def import_runs(store_path: str | Path | None, folder: Path) -> ImportResult:
    """Load an export into a store (created if needed). Validates everything before writing."""
    import polars as pl

    data = _read_export(folder)
    tables = {p.stem: p for p in sorted((folder / "tables").glob("*.parquet"))}
    if "runs" not in tables:
        raise InvalidInput(f"{folder} has no tables/runs.parquet; it is not a complete export")
    store = Store(store_path)
    if store.db_path.exists():
        store = Store.open_existing(store_path)  # refuses stores of a newer cwa
    # The store will have exactly this cwa's migrations once opened for writing (an existing
    # store of an older cwa is migrated then), so that is the schema the export must match.
    target_schema = [{"name": m.name, "checksum": m.checksum} for m in store.known_migrations()]
    _check_schema(data.get("schema", []), target_schema, store.label)
    ids = pl.read_parquet(tables["runs"], columns=["run_id"])["run_id"].to_list()
    existing: set[str] = set()
    if store.db_path.exists():
        with store.read() as con:
            existing = {
                r[0]
                for r in con.execute(
                    "SELECT run_id FROM runs WHERE list_contains(?, run_id)", [ids]
                ).fetchall()
            }
    new = [r for r in ids if r not in existing]
    _verify_artifacts(folder, data.get("artifacts", []), set(new))
    store = Store.open(store.path)  # creates and migrates a missing store
    copied = []
    rows: dict[str, int] = {}
    try:
        for run_id in new:
            source = folder / "artifacts" / run_id
            if source.is_dir():
                target = store.artifacts_dir(run_id)
                shutil.rmtree(target, ignore_errors=True)  # an orphan folder of the same id
                shutil.copytree(source, target)
                copied.append(target)
        with store.write() as con:
            known_tables = set(_run_tables(con))
            for table, path in tables.items():
                if table not in known_tables:
                    raise InvalidInput(f"the export has table {table!r} which this store lacks")
                frame = pl.read_parquet(path).filter(pl.col("run_id").is_in(new))
                if table == "runs":  # the source's MLflow copy is not in this store's mirror
                    frame = frame.with_columns(pl.lit(None, pl.Utf8).alias("mlflow_run_id"))
                if frame.height == 0:
                    continue
                con.register("_cwa_import", frame.to_arrow())
                try:
                    con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM _cwa_import')
                finally:
                    con.unregister("_cwa_import")
                rows[table] = frame.height
            missing = con.execute(
                "SELECT DISTINCT parent_run_id FROM run_parents WHERE list_contains(?, run_id) "
                "AND parent_run_id NOT IN (SELECT run_id FROM runs) ORDER BY 1",
                [new],
            ).fetchall()
    except BaseException:
        for target in copied:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return ImportResult(new, sorted(existing), rows, [m[0] for m in missing])


@dataclass
class GcResult:
    removed: list[tuple[str, int]]  # (folder or file name under artifacts/, bytes)
    dry_run: bool

    @property
    def freed(self) -> int:
        return sum(b for _, b in self.removed)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def collect_garbage(store: Store, *, dry_run: bool = False) -> GcResult:
    """Remove entries of ``artifacts/`` that belong to no run of the store (e.g. killed runs)."""
    root = store.artifacts_root
    # List first, then read the runs: a run's row is committed before its folder is created, so
    # a folder listed here whose run is registered meanwhile is still found in `known`.
    entries = sorted(root.iterdir()) if root.is_dir() else []
    with store.read() as con:
        known = {r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()}
    removed = []
    for entry in entries:
        if entry.name in known:
            continue
        removed.append((entry.name, _size(entry)))
        if not dry_run:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return GcResult(removed, dry_run)
