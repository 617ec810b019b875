"""Queries the stages run against the store, in one place (no SQL strings inside stages).

Each function opens a short read transaction (``store.read()``) and returns plain Python values
or a polars frame. Stages call these; the CLI's ``cwa sql`` stays the way for ad-hoc questions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput
from cwa.store.runs import RunRecord, fetch_run, resolve_run_id

if TYPE_CHECKING:
    from cwa.store.store import Store


def succeeded_run(store: Store, ref: str, stage: str) -> RunRecord:
    """The run ``ref`` (id, prefix, ``latest``) of ``stage``; refused unless it succeeded."""
    with store.read() as con:
        run_id = resolve_run_id(con, ref, stage=stage, store_label=store.label)
        run = fetch_run(con, run_id)
    if run.status != "succeeded":
        raise InvalidInput(f"{stage} run {run_id} is {run.status}; use a succeeded {stage} run")
    return run


def parent_run(store: Store, run: RunRecord, role: str) -> RunRecord:
    """The parent of ``run`` recorded with ``role`` (e.g. the score run of a rank run)."""
    parent_id = next((p for p, r in run.parents if r == role), None)
    if parent_id is None:
        raise InvalidInput(f"{run.stage} run {run.run_id} records no '{role}' parent run")
    with store.read() as con:
        return fetch_run(con, parent_id)


def count_ranked(store: Store, rank_id: str) -> int:
    """Rows a rank run stored in ``ranked_weights``."""
    with store.read() as con:
        (n,) = con.execute(
            "SELECT count(*) FROM ranked_weights WHERE run_id = ?", [rank_id]
        ).fetchone()
    return int(n)


def ranked_rows(store: Store, rank_id: str) -> Any:
    """(group_key, rank, parameter, flat_index, layer) of a rank run, best first within the
    run (rank, then insertion order), as a polars frame."""
    import polars as pl

    with store.read() as con:
        rows = con.execute(
            "SELECT group_key, rank, parameter, flat_index, layer FROM ranked_weights "
            "WHERE run_id = ? ORDER BY rank, rowid",
            [rank_id],
        ).fetchall()
    return pl.DataFrame(
        rows,
        schema={
            "group_key": pl.String,
            "rank": pl.Int64,
            "parameter": pl.String,
            "flat_index": pl.Int64,
            "layer": pl.Int64,
        },
        orient="row",
    )


def ranked_layers(store: Store, rank_id: str) -> set[int | None]:
    """Distinct layers holding ranked weights of a rank run (None: outside the layer stack)."""
    with store.read() as con:
        rows = con.execute(
            "SELECT DISTINCT layer FROM ranked_weights WHERE run_id = ?", [rank_id]
        ).fetchall()
    return {row[0] for row in rows}


def run_ids(store: Store) -> list[str]:
    """Every run id in the store (tests compare it before and after a refused command)."""
    with store.read() as con:
        return [row[0] for row in con.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()]
