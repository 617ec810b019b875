"""What the MLflow mirror shows for a run, read from the store's tables (no MLflow import).

The stages store their results in typed tables; a researcher comparing runs in the MLflow UI
wants a few numbers per run next to each other across seeds: calibration loss, where the score
mass sits (per component and layer), what the top-k is made of, and per task the baseline and
the damage of each selection. :func:`derived_metrics` computes those from the tables, so the
stages need not know about MLflow. :func:`dataset_inputs` describes the calibration and
evaluation data (name, source, digest) and :func:`description` the lineage as links.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa.file_digest import file_sha256
from cwa.store.runs import RunRecord

if TYPE_CHECKING:
    import duckdb


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    digest: str
    source_type: str  # local, hugging_face, code
    source: str
    context: str  # calibration or evaluation
    profile: dict[str, Any]


def _table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]
    ).fetchone()
    return bool(row and row[0])


def _key(*parts: Any) -> str:
    return ".".join(str(p).replace(",", "+") for p in parts)


def _layer(layer: Any) -> str:
    return "none" if layer is None else f"{int(layer):02d}"


def _shares(rows: list[tuple[Any, float]], prefix: str) -> dict[str, float]:
    total = sum(v for _, v in rows if v is not None)
    if not total:
        return {}
    return {_key(prefix, k): float(v) / total for k, v in rows if v is not None}


def derived_metrics(con: duckdb.DuckDBPyConnection, run: RunRecord) -> dict[str, float]:
    """Comparable numbers computed from the run's stored rows (on top of its run_metrics)."""
    out: dict[str, float] = {}
    rid = run.run_id
    if _table_exists(con, "tensor_stats"):
        by_component = con.execute(
            "SELECT component, sum(sum) FROM tensor_stats WHERE run_id = ? GROUP BY ALL", [rid]
        ).fetchall()
        out.update(_shares(by_component, "mass_share.component"))
        by_layer = con.execute(
            "SELECT layer, sum(sum) FROM tensor_stats WHERE run_id = ? GROUP BY ALL", [rid]
        ).fetchall()
        out.update(_shares([(_layer(layer), v) for layer, v in by_layer], "mass_share.layer"))
        top = con.execute(
            "SELECT sum(top1pct_mass_share * sum) / nullif(sum(sum), 0) FROM tensor_stats "
            "WHERE run_id = ?",
            [rid],
        ).fetchone()
        if top and top[0] is not None:
            out["top1pct_mass_share"] = float(top[0])
    if _table_exists(con, "ranked_weights"):
        # Composition of the (first group's) top-k: the global ranking has one group, 'all'.
        for column, prefix in (
            ("component", "topk_share.component"),
            ("layer", "topk_share.layer"),
        ):
            rows = con.execute(
                f"SELECT {column}, count(*) FROM ranked_weights WHERE run_id = ? AND group_key = "
                "(SELECT min(group_key) FROM ranked_weights WHERE run_id = ?) GROUP BY ALL",
                [rid, rid],
            ).fetchall()
            if column == "layer":
                rows = [(_layer(layer), n) for layer, n in rows]
            out.update(_shares(rows, prefix))
    if _table_exists(con, "perturbation_conditions"):
        rows = con.execute(
            "SELECT selection, task, metric, avg(value), any_value(baseline), avg(delta), "
            "avg(ratio) FROM perturbation_effects WHERE run_id = ? AND metric <> 'tokens' "
            "GROUP BY ALL",
            [rid],
        ).fetchall()
        for selection, task, metric, _mean, baseline, delta, ratio in rows:
            if baseline is not None:
                out[_key("baseline", task, metric)] = float(baseline)
            if delta is not None:
                out[_key("damage", selection, task, metric)] = float(delta)
            if ratio is not None:
                out[_key("ratio", selection, task, metric)] = float(ratio)
    return out


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _calibration(run: RunRecord) -> DatasetSpec | None:
    data = run.config.get("data")
    if not isinstance(data, dict) or not data.get("source"):
        return None
    source = str(data["source"])
    sample = {k: data.get(k) for k in ("n_samples", "seq_len", "text_column")}
    sample["seed"] = run.seed
    if source.startswith("hf:"):
        kind, name, digest = "hugging_face", source[3:], _digest(source, sample)
    elif source == "toy":
        kind, name, digest = "code", "toy", _digest(source, sample, run.model_fingerprint)
    else:
        path = Path(source)
        kind, name = "local", path.name
        # The file's content identifies the data; the sampling settings pick from it.
        content = file_sha256(path)[:16] if path.is_file() else "missing"
        digest = _digest(content, sample)
        source = str(path.resolve()) if path.exists() else source
    return DatasetSpec(name, digest, kind, source, "calibration", {k: v for k, v in sample.items()})


def dataset_inputs(con: duckdb.DuckDBPyConnection, run: RunRecord) -> list[DatasetSpec]:
    """Calibration data (score runs) and evaluation tasks (evaluate/perturb runs)."""
    specs: list[DatasetSpec] = []
    calibration = _calibration(run)
    if calibration is not None:
        specs.append(calibration)
    if _table_exists(con, "evaluations"):
        rows = con.execute(
            "SELECT task, task_config_hash, max(n) FROM evaluations WHERE run_id = ? AND "
            "condition_id IS NULL GROUP BY ALL ORDER BY task",
            [run.run_id],
        ).fetchall()
        limit = run.config.get("limit")
        for task, config_hash, n in rows:
            specs.append(
                DatasetSpec(
                    name=str(task),
                    digest=str(config_hash)[:16],
                    source_type="code" if run.model_ref in ("toy", "toy-llama") else "local",
                    source=f"cwa task {task}" + (f" (limit {limit})" if limit else ""),
                    context="evaluation",
                    profile={"n": n, "task_config_hash": config_hash},
                )
            )
    return specs


def run_name(run: RunRecord) -> str:
    """A short, readable MLflow run name that starts with the stage."""
    c = run.config
    detail = {
        "score": c.get("metric"),
        "rank": f"{c.get('mode')}-top{c.get('topk')}" if c.get("topk") is not None else None,
        "perturb": c.get("method"),
        "evaluate": (c.get("tasks") or "").replace(",", "+") or None,
    }.get(run.stage)
    parts = [run.stage, detail, None if run.seed is None else f"s{run.seed}", run.run_id[-6:]]
    return "-".join(str(p) for p in parts if p).lower()


def description(
    run: RunRecord,
    links: dict[str, str],
    note: str | None = None,
    children: list[tuple[str, str]] | tuple = (),
) -> str:
    """Markdown for the run's description: the note, then lineage as links to MLflow runs.

    ``links`` maps cwa run ids to their MLflow UI path (``#/experiments/E/runs/R``);
    ``children`` lists (run id, stage) of the runs made from this one.
    """
    lines = []
    if note:
        lines += [note, ""]
    lines.append(f"cwa run `{run.run_id}` ({run.stage}, {run.status})")
    if run.command:
        lines.append(f"command: `{run.command}`")
    if run.parents:
        lines += ["", "Parents:"]
        for parent, role in run.parents:
            target = links.get(parent)
            text = f"{role}: {parent}"
            lines.append(f"- [{text}]({target})" if target else f"- {text} (not mirrored)")
    if children:
        lines += ["", "Children:"]
        for child, stage in children:
            target = links.get(child)
            text = f"{stage}: {child}"
            lines.append(f"- [{text}]({target})" if target else f"- {text} (not mirrored)")
    return "\n".join(lines)
