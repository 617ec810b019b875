"""The run registry: create, resolve, list, inspect and delete runs in a store.

A run is one invocation of a stage. Ids are ULIDs and may be abbreviated to any unique prefix;
``latest`` resolves to the newest run and ``latest:STAGE`` to the newest run of a stage.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cwa.errors import AmbiguousRunId, InvalidInput, RunNotFound
from cwa.pids import pid_alive
from cwa.store.store import Store

if TYPE_CHECKING:
    import duckdb

RUN_STATUSES = ("running", "succeeded", "failed", "interrupted")

_RUN_COLUMNS = (
    "run_id, stage, experiment, status, model_ref, model_fingerprint, seed, config, created_at, "
    "finished_at, duration_s, error, cwa_version, versions, device, git_sha, hostname, pid, "
    "command, mlflow_run_id"
)


@dataclass
class RunRecord:
    run_id: str
    stage: str
    experiment: str
    status: str
    model_ref: str | None
    model_fingerprint: str | None
    seed: int | None
    config: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    error: str | None
    cwa_version: str
    versions: dict[str, Any]
    device: str | None
    git_sha: str | None
    hostname: str | None
    pid: int | None
    command: str | None
    mlflow_run_id: str | None
    parents: list[tuple[str, str]] = field(default_factory=list)  # (parent_run_id, role)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        out["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        out["parents"] = [{"run_id": p, "role": r} for p, r in self.parents]
        return out


def _record(row: tuple, parents: list[tuple[str, str]]) -> RunRecord:
    values = list(row)
    values[7] = json.loads(values[7]) if values[7] else {}
    values[13] = json.loads(values[13]) if values[13] else {}
    return RunRecord(*values, parents=parents)


def fetch_run(con: duckdb.DuckDBPyConnection, run_id: str) -> RunRecord:
    row = con.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if row is None:
        raise RunNotFound(f"no run {run_id!r} in this store; see `cwa runs list`")
    parents = con.execute(
        "SELECT parent_run_id, role FROM run_parents WHERE run_id = ? ORDER BY parent_run_id",
        [run_id],
    ).fetchall()
    return _record(row, [(p, r) for p, r in parents])


def resolve_run_id(
    con: duckdb.DuckDBPyConnection, ref: str, *, stage: str | None = None, store_label: str = ""
) -> str:
    """Turn a full id, a unique prefix, ``latest`` or ``latest:STAGE`` into a full run id.

    ``stage`` restricts the search (e.g. ``rank`` needs a score run); a run of another stage
    is reported as such rather than as missing.
    """
    ref = ref.strip()
    where = f" in store {store_label}" if store_label else ""
    if not ref:
        raise InvalidInput("empty run id; pass a run id, a unique prefix or 'latest'")
    if ref == "latest" or ref.startswith("latest:"):
        wanted = ref.partition(":")[2] or stage
        if stage is not None and wanted != stage:
            raise InvalidInput(f"{ref!r} names a {wanted} run, but a {stage} run is needed here")
        # 'latest' means the newest run that finished well: a failed attempt is not an input.
        sql = "SELECT run_id FROM runs WHERE status = 'succeeded'"
        params: list[Any] = []
        if wanted:
            sql += " AND stage = ?"
            params.append(wanted)
        row = con.execute(sql + " ORDER BY run_id DESC LIMIT 1", params).fetchone()
        if row is None:
            what = f"succeeded {wanted} run" if wanted else "succeeded run"
            raise RunNotFound(f"no {what}{where} to resolve {ref!r}; see `cwa runs list`")
        return str(row[0])
    matches = con.execute(
        "SELECT run_id, stage FROM runs WHERE starts_with(run_id, ?) ORDER BY run_id LIMIT 6",
        [ref.upper()],
    ).fetchall()
    if not matches:
        raise RunNotFound(f"no run matches {ref!r}{where}; see `cwa runs list`")
    if len(matches) > 1:
        shown = ", ".join(f"{r} ({s})" for r, s in matches[:5])
        raise AmbiguousRunId(
            f"run id prefix {ref!r} matches several runs: {shown}; give more characters"
        )
    run_id, run_stage = matches[0]
    if stage is not None and run_stage != stage:
        raise InvalidInput(f"run {run_id} is a {run_stage} run, but a {stage} run is needed here")
    return str(run_id)


def insert_run(con: duckdb.DuckDBPyConnection, record: RunRecord) -> None:
    con.execute(
        f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES ({', '.join(['?'] * 20)})",
        [
            record.run_id,
            record.stage,
            record.experiment,
            record.status,
            record.model_ref,
            record.model_fingerprint,
            record.seed,
            json.dumps(record.config, sort_keys=True, default=str),
            record.created_at,
            record.finished_at,
            record.duration_s,
            record.error,
            record.cwa_version,
            json.dumps(record.versions, sort_keys=True),
            record.device,
            record.git_sha,
            record.hostname,
            record.pid,
            record.command,
            record.mlflow_run_id,
        ],
    )
    for parent, role in record.parents:
        con.execute("INSERT INTO run_parents VALUES (?, ?, ?)", [record.run_id, parent, role])


def mark_stale_runs(con: duckdb.DuckDBPyConnection) -> int:
    """Mark runs left 'running' by a process of this host that no longer exists as interrupted."""
    host = socket.gethostname()
    rows = con.execute(
        "SELECT run_id, pid FROM runs WHERE status = 'running' AND hostname = ?", [host]
    ).fetchall()
    stale = [run_id for run_id, pid in rows if pid is not None and not _pid_alive(int(pid))]
    for run_id in stale:
        con.execute(
            "UPDATE runs SET status = 'interrupted', error = ? WHERE run_id = ?",
            ["the process running this stage ended without finishing (killed?)", run_id],
        )
    return len(stale)


def _pid_alive(pid: int) -> bool:
    return pid == os.getpid() or pid_alive(pid)


def list_runs(
    store: Store,
    *,
    stage: str | None = None,
    experiment: str | None = None,
    status: str | None = None,
    limit: int | None = 50,
) -> list[RunRecord]:
    """Newest first."""
    if status is not None and status not in RUN_STATUSES:
        raise InvalidInput(f"unknown status {status!r}; use one of {', '.join(RUN_STATUSES)}")
    if limit is not None and limit < 1:
        raise InvalidInput("--limit must be at least 1")
    clauses, params = [], []
    for column, value in (("stage", stage), ("experiment", experiment), ("status", status)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    sql = f"SELECT {_RUN_COLUMNS} FROM runs"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY run_id DESC"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    with store.read() as con:
        rows = con.execute(sql, params).fetchall()
        parent_rows = con.execute(
            "SELECT run_id, parent_run_id, role FROM run_parents ORDER BY parent_run_id"
        ).fetchall()
    parents: dict[str, list[tuple[str, str]]] = {}
    for run_id, parent, role in parent_rows:
        parents.setdefault(run_id, []).append((parent, role))
    return [_record(row, parents.get(row[0], [])) for row in rows]


def result_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Base tables (not views) that hold per-run rows, i.e. have a ``run_id`` column."""
    rows = con.execute(
        "SELECT c.table_name FROM information_schema.columns c "
        "JOIN information_schema.tables t ON t.table_name = c.table_name "
        "WHERE c.column_name = 'run_id' AND t.table_type = 'BASE TABLE' "
        "AND c.table_name NOT IN ('runs', 'run_parents') ORDER BY c.table_name"
    ).fetchall()
    return [r[0] for r in rows]


@dataclass
class RunDetails:
    run: RunRecord
    children: list[tuple[str, str, str]]  # (run_id, stage, status)
    ancestors: list[tuple[str, int]]  # (run_id, depth)
    metrics: dict[str, float]
    artifacts: list[dict[str, Any]]
    result_counts: dict[str, int]  # table -> rows for this run
    tags: dict[str, str] = field(default_factory=dict)  # user tags; 'note' is the note

    def to_dict(self) -> dict[str, Any]:
        return {
            "tags": self.tags,
            "run": self.run.to_dict(),
            "children": [{"run_id": r, "stage": s, "status": st} for r, s, st in self.children],
            "ancestors": [{"run_id": r, "depth": d} for r, d in self.ancestors],
            "metrics": self.metrics,
            "artifacts": self.artifacts,
            "results": self.result_counts,
        }


def run_details(store: Store, ref: str) -> RunDetails:
    with store.read() as con:
        run_id = resolve_run_id(con, ref, store_label=store.label)
        run = fetch_run(con, run_id)
        children = con.execute(
            "SELECT r.run_id, r.stage, r.status FROM run_parents p JOIN runs r "
            "ON r.run_id = p.run_id WHERE p.parent_run_id = ? ORDER BY r.run_id",
            [run_id],
        ).fetchall()
        ancestors = con.execute(
            "SELECT ancestor_run_id, depth FROM run_lineage WHERE run_id = ? "
            "ORDER BY depth, ancestor_run_id",
            [run_id],
        ).fetchall()
        metrics = dict(
            con.execute(
                "SELECT name, value FROM run_metrics WHERE run_id = ? ORDER BY name", [run_id]
            ).fetchall()
        )
        artifacts = [
            {"name": n, "kind": k, "bytes": b, "sha256": s}
            for n, k, b, s in con.execute(
                "SELECT name, kind, bytes, sha256 FROM run_artifacts WHERE run_id = ? "
                "ORDER BY name",
                [run_id],
            ).fetchall()
        ]
        counts = {}
        for table in result_tables(con):
            if table in ("run_metrics", "run_artifacts", "run_tags"):
                continue
            n = con.execute(f'SELECT count(*) FROM "{table}" WHERE run_id = ?', [run_id])
            count = int(n.fetchone()[0])
            if count:
                counts[table] = count
        from cwa.store.tags import tags_of

        tags = tags_of(con, run_id)
    return RunDetails(run, list(children), list(ancestors), metrics, artifacts, counts, tags)


def delete_run(store: Store, ref: str, *, recursive: bool = False) -> list[str]:
    """Delete a run (and with ``recursive`` its descendants): rows, lineage and artifacts.

    Refuses when the run has children and ``recursive`` is false. Returns deleted run ids.
    Database rows go in one transaction; artifact folders are removed after it commits.
    """
    return list(delete_runs(store, ref, recursive=recursive))


def delete_runs(store: Store, ref: str, *, recursive: bool = False) -> dict[str, str | None]:
    """:func:`delete_run`, returning {deleted run id: its MLflow run id or None}."""
    with store.write() as con:
        run_id = resolve_run_id(con, ref, store_label=store.label)
        descendants = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT run_id FROM run_lineage WHERE ancestor_run_id = ? ORDER BY run_id",
                [run_id],
            ).fetchall()
        ]
        if descendants and not recursive:
            shown = ", ".join(descendants[:5]) + (" ..." if len(descendants) > 5 else "")
            raise InvalidInput(
                f"run {run_id} has {len(descendants)} dependent run(s) ({shown}); delete them "
                "first or pass --recursive"
            )
        doomed = [run_id, *descendants]
        running = con.execute(
            "SELECT run_id FROM runs WHERE status = 'running' AND list_contains(?, run_id)",
            [doomed],
        ).fetchall()
        if running:
            raise InvalidInput(
                f"run {running[0][0]} is still running; wait for it or interrupt it first"
            )
        mirrored = dict(
            con.execute(
                "SELECT run_id, mlflow_run_id FROM runs WHERE list_contains(?, run_id)", [doomed]
            ).fetchall()
        )
        for table in result_tables(con):
            con.execute(f'DELETE FROM "{table}" WHERE list_contains(?, run_id)', [doomed])
        con.execute(
            "DELETE FROM run_parents WHERE list_contains(?, run_id) "
            "OR list_contains(?, parent_run_id)",
            [doomed, doomed],
        )
        con.execute("DELETE FROM runs WHERE list_contains(?, run_id)", [doomed])
    for rid in doomed:
        folder = store.artifacts_dir(rid)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
    return {rid: mirrored.get(rid) for rid in doomed}
