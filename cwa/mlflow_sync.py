"""Managing the MLflow mirror after the fact: re-mirror runs (``cwa mlflow sync``), push tags
and notes (``cwa runs tag``), delete mirrored runs (``cwa runs delete``) and the UI address of
an experiment's runs table (``cwa mlflow ui``). See :mod:`cwa.mlflow_mirror` for what a mirrored
run holds.
"""

from __future__ import annotations

import os
from typing import Any

from cwa.errors import CwaError
from cwa.mlflow_background import clear_pending, mirror_lock
from cwa.mlflow_mirror import (
    MirrorFailed,
    _client,
    _first_line,
    _mirror,
    _mirrored_copies,
    refresh_descriptions,
    tracking_uri,
)
from cwa.progress import NULL_REPORTER, Reporter
from cwa.store.runs import fetch_run, resolve_run_id
from cwa.store.store import Store
from cwa.store.tags import NOTE_KEY, tags_of


def sync_runs(
    store: Store,
    refs: list[str] | None = None,
    *,
    copy_scores: bool | None = None,
    reporter: Reporter | None = None,
) -> list[tuple[str, str]]:
    """(Re-)mirror runs (all finished runs when ``refs`` is empty), oldest first.

    Returns (cwa run id, MLflow run id) pairs. Unknown references are refused before anything
    is written; an MLflow failure raises :class:`MirrorFailed` naming the run.
    """
    reporter = reporter or NULL_REPORTER
    with store.read() as con:
        if refs:
            ids = sorted({resolve_run_id(con, r, store_label=store.label) for r in refs})
        else:
            ids = [
                r[0]
                for r in con.execute(
                    "SELECT run_id FROM runs WHERE status <> 'running' ORDER BY run_id"
                ).fetchall()
            ]
    try:
        client = _client(store)
    except Exception as exc:
        raise MirrorFailed(
            f"cannot open MLflow at {tracking_uri(store)} ({_first_line(exc)})"
        ) from exc
    done = []
    # A background mirror worker (cwa.mlflow_background) finishes first; the runs still queued
    # for it are mirrored here and leave its queue.
    with mirror_lock(store):
        for run_id in ids:
            try:
                done.append((run_id, _mirror(store, run_id, client, copy_scores)))
            except Exception as exc:
                raise MirrorFailed(
                    f"mirroring run {run_id} to {tracking_uri(store)} failed "
                    f"({_first_line(exc)}); {len(done)} run(s) before it were mirrored"
                ) from exc
            clear_pending(store, [run_id])
            reporter.info(f"mirrored {run_id} -> MLflow run {done[-1][1]}")
        _relink_children(store, client, {r for r, _ in done})
    return done


def _relink_children(store: Store, client: Any, changed: set[str]) -> None:
    """Parents and children of re-mirrored runs link to the new MLflow copies."""
    if not changed:
        return
    with store.read() as con:
        related = con.execute(
            "SELECT DISTINCT run_id FROM run_parents WHERE list_contains($ids, parent_run_id) "
            "UNION SELECT DISTINCT parent_run_id FROM run_parents "
            "WHERE list_contains($ids, run_id)",
            {"ids": sorted(changed)},
        ).fetchall()
    refresh_descriptions(store, client, sorted({r for (r,) in related} - changed))


def push_tags(store: Store, run_id: str, removed: list[str], reporter: Reporter) -> bool:
    """Copy a run's user tags and note to its MLflow run (if mirrored). False on failure."""
    with store.read() as con:
        run = fetch_run(con, run_id)
        tags = tags_of(con, run_id)
    if not run.mlflow_run_id:
        return False
    try:
        client = _client(store)
        refresh_descriptions(store, client, [run_id])
        for key, value in tags.items():
            if key != NOTE_KEY:
                client.set_tag(run.mlflow_run_id, key, value)
        for key in removed:
            if key != NOTE_KEY:
                try:
                    client.delete_tag(run.mlflow_run_id, key)
                except Exception:  # never set there
                    pass
    except Exception as exc:
        reporter.warn(
            f"MLflow tags of run {run_id} not updated ({_first_line(exc)}); they are stored; "
            "`cwa mlflow sync` retries"
        )
        return False
    return True


def delete_mirrored(
    store: Store, runs: dict[str, str | None], reporter: Reporter | None = None
) -> list[str]:
    """Mark the MLflow copies of deleted cwa runs deleted; returns the MLflow ids deleted."""
    reporter = reporter or NULL_REPORTER
    if not runs or (
        not store.mlflow_db_path.exists() and not os.environ.get("MLFLOW_TRACKING_URI")
    ):
        return []
    deleted = []
    try:
        client = _client(store)
        for run_id, known in runs.items():
            for mlflow_id in _mirrored_copies(client, run_id, known):
                client.delete_run(mlflow_id)
                deleted.append(mlflow_id)
    except Exception as exc:
        reporter.warn(f"MLflow runs of the deleted run(s) not removed ({_first_line(exc)})")
    return deleted


def experiment_url(store: Store, experiment: str, base_url: str) -> str:
    """The MLflow UI address of an experiment's runs table (classic machine-learning view).

    MLflow 3.17 picks the runs view from the ``workflowType`` query parameter (else the last
    choice in the browser, GenAI by default), so the link names it.
    """
    client = _client(store)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise CwaError(
            f"no MLflow experiment {experiment!r} at {tracking_uri(store)}; run a stage with the "
            "mirror on or `cwa mlflow sync`"
        )
    base = base_url.rstrip("/")
    return f"{base}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning"
