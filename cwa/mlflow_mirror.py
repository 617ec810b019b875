"""Mirror of runs into MLflow, for comparison in the MLflow UI.

DuckDB is the source of truth and is always written first; this module copies a finished run
into MLflow (one MLflow experiment per store experiment label, tagged as a machine-learning
experiment so that the UI's experiment-kind selector does not offer the GenAI views):

- params from the flattened config; tags: stage, cwa run id, parents, seed, model, user tags
  (``cwa runs tag``); the command and cwa version as the run's source; the description holds
  the note and the lineage as links to the parents' MLflow runs;
- metrics: the run's stored metrics plus the comparable numbers of :mod:`cwa.mlflow_summary`;
- the calibration and evaluation data as MLflow dataset inputs (name, source, digest);
- artifacts: plots, reports and other small files are copied (up to
  ``CWA_MLFLOW_MAX_ARTIFACT_MB``, default 100). Score files are referenced, not copied: their
  path and sha256 go to tags and to ``cwa_artifacts.json``; ``CWA_MLFLOW_COPY_SCORES=1`` (or
  ``cwa mlflow sync --copy-scores``) copies them too.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<store>/mlflow.db`` with
artifacts under ``<store>/mlflow-artifacts``. A failure while a stage mirrors is a warning and
never loses data; ``cwa mlflow sync`` re-mirrors (replacing the run's earlier MLflow copy).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from datetime import UTC
from pathlib import Path
from typing import Any

from cwa.errors import CwaError
from cwa.mlflow_summary import dataset_inputs, derived_metrics, description, run_name
from cwa.progress import NULL_REPORTER, Reporter
from cwa.store.runs import RunRecord, fetch_run
from cwa.store.store import Store
from cwa.store.tags import NOTE_KEY, tags_of

_MAX_PARAM_LEN = 6000
_BATCH = 100
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's "Machine learning" experiment kind
_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_COPIED_KINDS = ("plot", "report", "table", "data", "other")

_MLFLOW_NAME_RE = re.compile(r"[^A-Za-z0-9_\-. :/]")


class MirrorFailed(CwaError):
    """MLflow could not be written (only raised where mirroring is the point, e.g. sync)."""


def mlflow_name(name: str) -> str:
    """A metric/param name MLflow accepts (alphanumerics, _ - . space : /)."""
    return _MLFLOW_NAME_RE.sub("_", name)


def _epoch_ms(value: Any) -> int | None:
    # Stored timestamps are naive UTC; .timestamp() on a naive value would assume local time.
    return None if value is None else int(value.replace(tzinfo=UTC).timestamp() * 1000)


def tracking_uri(store: Store) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store.mlflow_db_path.resolve()}"


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": "value"} with values as strings (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            text = value if isinstance(value, str) else repr(value) if value is None else str(value)
            flat[name] = text[:_MAX_PARAM_LEN]
    return flat


def _max_artifact_bytes() -> int:
    try:
        return int(float(os.environ.get("CWA_MLFLOW_MAX_ARTIFACT_MB", "100")) * 1024 * 1024)
    except ValueError:
        return 100 * 1024 * 1024


def copy_scores_default() -> bool:
    value = os.environ.get("CWA_MLFLOW_COPY_SCORES", "0").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _client(store: Store) -> Any:
    from mlflow.tracking import MlflowClient

    # MLflow configures its loggers on import; quieten them afterwards ("Creating initial MLflow
    # database tables..." is chatter, not something a researcher acts on).
    for name in ("alembic", "mlflow", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri(store))


def mirror_run(
    store: Store,
    run_id: str,
    *,
    reporter: Reporter | None = None,
    copy_scores: bool | None = None,
    fresh: bool = False,
) -> str | None:
    """Copy a run to MLflow; returns the MLflow run id, or None (with a warning) on failure.

    ``fresh``: the run was never mirrored (a stage that just finished), so MLflow is not
    searched for earlier copies to replace.
    """
    reporter = reporter or NULL_REPORTER
    try:
        return _mirror(store, run_id, _client(store), copy_scores, fresh=fresh)
    except Exception as exc:  # the mirror must never lose or block data
        reporter.warn(
            f"MLflow mirror failed for run {run_id} ({_first_line(exc)}); the run is safe in the "
            "DuckDB store (retry with `cwa mlflow sync`, or disable the mirror with --no-mlflow "
            "/ CWA_MLFLOW=0)"
        )
        return None


def _experiment_id(client: Any, store: Store, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            location = (store.path / "mlflow-artifacts" / name).resolve().as_uri()
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    if experiment is None or experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    return experiment_id


def _mirrored_copies(client: Any, run_id: str, known: str | None) -> list[str]:
    """Active MLflow runs that mirror this cwa run (the recorded one and any tagged copy)."""
    ids = set()
    if known:
        try:
            if client.get_run(known).info.lifecycle_stage == "active":
                ids.add(known)
        except Exception:  # already gone from MLflow
            pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    if experiments:
        found = client.search_runs(experiments, filter_string=f"tags.`cwa.run_id` = '{run_id}'")
        ids.update(r.info.run_id for r in found)
    return sorted(ids)


def _children(con: Any, run_id: str) -> list[tuple[str, str]]:
    return con.execute(
        "SELECT r.run_id, r.stage FROM run_parents p JOIN runs r ON r.run_id = p.run_id "
        "WHERE p.parent_run_id = ? ORDER BY r.run_id",
        [run_id],
    ).fetchall()


def _links(con: Any, client: Any, run: RunRecord) -> dict[str, str]:
    """MLflow UI paths of the run's parents and children that have an active MLflow copy."""
    links = {}
    related = [p for p, _ in run.parents] + [c for c, _ in _children(con, run.run_id)]
    for other in related:
        row = con.execute("SELECT mlflow_run_id FROM runs WHERE run_id = ?", [other]).fetchone()
        if row and row[0]:
            try:
                info = client.get_run(row[0]).info
            except Exception:
                continue
            if info.lifecycle_stage == "active":
                links[other] = f"#/experiments/{info.experiment_id}/runs/{info.run_id}"
    return links


def run_description(con: Any, client: Any, run: RunRecord) -> str:
    """The MLflow description of a run: its note and links to its parents and children."""
    return description(
        run,
        _links(con, client, run),
        tags_of(con, run.run_id).get(NOTE_KEY),
        children=_children(con, run.run_id),
    )


def refresh_descriptions(store: Store, client: Any, run_ids: list[str]) -> None:
    """Rewrite the descriptions of mirrored runs (e.g. a parent gained a child)."""
    with store.read() as con:
        for run_id in run_ids:
            run = fetch_run(con, run_id)
            if not run.mlflow_run_id:
                continue
            try:
                client.set_tag(
                    run.mlflow_run_id, "mlflow.note.content", run_description(con, client, run)
                )
            except Exception:  # its MLflow copy is gone; `cwa mlflow sync` recreates it
                continue


def source_name(run: RunRecord) -> str:
    """The command and cwa version, as the run's MLflow source.

    The MLflow UI shows only the last path component of a local source, so path arguments are
    shortened to their file names here (the full command is in the description).
    """
    command = run.command or f"cwa {run.stage}"
    words = [Path(w).name if "/" in w and not w.startswith("hf:") else w for w in command.split()]
    return f"{' '.join(words)} (cwa {run.cwa_version})"[:500]


def _tags(run: RunRecord, store: Store, user_tags: dict[str, str], note: str) -> dict[str, str]:
    tags = {
        "cwa.stage": run.stage,
        "cwa.run_id": run.run_id,
        "cwa.parents": ",".join(p for p, _ in run.parents),
        "cwa.seed": "" if run.seed is None else str(run.seed),
        "cwa.model": run.model_ref or "",
        "cwa.model_fingerprint": run.model_fingerprint or "",
        "cwa.status": run.status,
        "cwa.store": str(store.path.resolve()),
        "cwa.git_sha": run.git_sha or "",
        "cwa.version": run.cwa_version,
        "mlflow.runName": run_name(run),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": source_name(run),
        "mlflow.note.content": note,
        "mlflow.user": os.environ.get("USER", "") or "cwa",
    }
    if run.git_sha:
        tags["mlflow.source.git.commit"] = run.git_sha
    tags.update({k: v for k, v in user_tags.items() if k != NOTE_KEY})
    return tags


def _mirror(
    store: Store, run_id: str, client: Any, copy_scores: bool | None, *, fresh: bool = False
) -> str:
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

    copy_scores = copy_scores_default() if copy_scores is None else copy_scores
    with store.read() as con:
        run = fetch_run(con, run_id)
        metrics = dict(
            con.execute(
                "SELECT name, value FROM run_metrics WHERE run_id = ? ORDER BY name", [run_id]
            ).fetchall()
        )
        extra = derived_metrics(con, run)
        datasets = dataset_inputs(con, run)
        artifacts = con.execute(
            "SELECT name, kind, bytes, sha256 FROM run_artifacts WHERE run_id = ? ORDER BY name",
            [run_id],
        ).fetchall()
        user_tags = tags_of(con, run_id)
        note = run_description(con, client, run)
    experiment_id = _experiment_id(client, store, run.experiment)
    if not (fresh and run.mlflow_run_id is None):
        for old in _mirrored_copies(client, run_id, run.mlflow_run_id):
            client.delete_run(old)  # a re-mirror replaces the earlier copy
    start_ms = _epoch_ms(run.created_at)
    mlrun = client.create_run(
        experiment_id, start_time=start_ms, tags=_tags(run, store, user_tags, note)
    )
    mlflow_run_id = mlrun.info.run_id
    try:
        params = [Param(mlflow_name(k), v) for k, v in sorted(flatten_config(run.config).items())]
        values = {**extra, **metrics}  # a stage's own metric wins over a derived one
        metric_objs = [
            Metric(mlflow_name(name), float(value), start_ms or 0, 0)
            for name, value in sorted(values.items())
            if value is not None
        ]
        for i in range(0, max(len(params), len(metric_objs), 1), _BATCH):
            client.log_batch(
                mlflow_run_id, metrics=metric_objs[i : i + _BATCH], params=params[i : i + _BATCH]
            )
        if datasets:
            client.log_inputs(
                mlflow_run_id,
                datasets=[
                    DatasetInput(
                        Dataset(
                            d.name,
                            d.digest,
                            d.source_type,
                            d.source,
                            None,
                            json.dumps(d.profile, default=str),
                        ),
                        [InputTag("mlflow.data.context", d.context)],
                    )
                    for d in datasets
                ],
            )
        _log_artifacts(client, store, run_id, mlflow_run_id, artifacts, copy_scores)
    except Exception:
        # Do not leave a half-mirrored run looking like it is still running.
        client.set_terminated(mlflow_run_id, status="FAILED")
        raise
    status = _STATUS.get(run.status, "RUNNING")
    if status != "RUNNING":
        client.set_terminated(mlflow_run_id, status=status, end_time=_epoch_ms(run.finished_at))
    with store.write() as con:
        con.execute("UPDATE runs SET mlflow_run_id = ? WHERE run_id = ?", [mlflow_run_id, run_id])
    # The parents' descriptions now link to this run as their child.
    refresh_descriptions(store, client, [p for p, _ in run.parents])
    return mlflow_run_id


def _log_artifacts(
    client: Any,
    store: Store,
    run_id: str,
    mlflow_run_id: str,
    artifacts: list[tuple],
    copy_scores: bool,
) -> None:
    limit = _max_artifact_bytes()
    folder = store.artifacts_dir(run_id)
    referenced = []
    for name, kind, size, sha256 in artifacts:
        path = folder / name
        if not path.is_file():
            continue
        copy = copy_scores if kind == "scores" else (kind in _COPIED_KINDS and size <= limit)
        if copy:
            parent = str(Path(name).parent)
            client.log_artifact(mlflow_run_id, str(path), None if parent == "." else parent)
            continue
        ref = {"name": name, "kind": kind, "bytes": size, "sha256": sha256}
        ref["path"] = str(path.resolve())
        referenced.append(ref)
        if kind == "scores":
            stem = mlflow_name(Path(name).stem)
            client.set_tag(mlflow_run_id, f"cwa.{stem}.path", ref["path"][:5000])
            client.set_tag(mlflow_run_id, f"cwa.{stem}.sha256", sha256 or "")
    if referenced:
        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "cwa_artifacts.json"
            index.write_text(json.dumps({"not_copied": referenced}, indent=2) + "\n")
            client.log_artifact(mlflow_run_id, str(index))
