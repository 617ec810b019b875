"""Pieces every stage shares: model options, option checks, stored evaluations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput

if TYPE_CHECKING:
    from cwa.store import Store


@dataclass
class ModelOptions:
    """How to load the model a stage works on."""

    ref: str = "toy"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    device_map: str | None = None  # auto|balanced|FILE.json (cwa.models.device_map)


def is_toy_ref(ref: str | None) -> bool:
    return bool(ref) and ref.split(":")[0] in ("toy", "toy-gpt2", "toy-llama")


def check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and (isinstance(value, bool) or value < minimum):
        raise InvalidInput(f"--{name} must be at least {minimum}, got {value}")


def stored_evaluation(
    store: Store, fingerprint: str, task_config_hash: str, eval_key: str | None = None
) -> tuple[str, list[dict[str, Any]]] | None:
    """The newest succeeded evaluation of this exact model and task config, if any.

    Matches plain-model rows (condition_id NULL) from evaluate runs and from the baselines that
    perturb runs record. A result is reused only under the same evaluation key
    (:func:`cwa.evaluation.identity.evaluation_key`: weights, tokenizer, BOS, dtype, attention,
    engine version); without ``eval_key`` (a look-up before the model is loaded) any row
    written with a key for these weights matches. Rows without a key (written before the key
    existed) never match. Returns (run id, rows).
    """
    key_clause = "AND e.eval_key = ?" if eval_key is not None else "AND e.eval_key IS NOT NULL"
    params = [fingerprint, task_config_hash] + ([eval_key] if eval_key is not None else [])
    with store.read() as con:
        found = con.execute(
            "SELECT e.run_id FROM evaluations e JOIN runs r ON r.run_id = e.run_id "
            "WHERE r.status = 'succeeded' AND e.condition_id IS NULL "
            f"AND e.model_fingerprint = ? AND e.task_config_hash = ? {key_clause} "
            "ORDER BY e.run_id DESC LIMIT 1",
            params,
        ).fetchone()
        if found is None:
            return None
        rows = con.execute(
            "SELECT task, metric, value, stderr, n, task_config_hash, eval_key, note "
            "FROM evaluations WHERE run_id = ? AND condition_id IS NULL AND task_config_hash = ? "
            "ORDER BY rowid",
            [found[0], task_config_hash],
        ).fetchall()
    keys = ("task", "metric", "value", "stderr", "n", "task_config_hash", "eval_key", "note")
    return str(found[0]), [dict(zip(keys, row, strict=True)) for row in rows]


def calibration_records(store: Store, run_ids: list[str]) -> list[dict[str, Any]]:
    """The calibration texts of ``run_ids`` and their ancestors (score runs record one).

    Each: ``{"match_key", "heldout_fraction", "run_id"}``, for perplexity to hold out.
    """
    if not run_ids:
        return []
    import json

    marks = ", ".join("?" for _ in run_ids)
    with store.read() as con:
        found = con.execute(
            "SELECT run_id, config FROM runs WHERE run_id IN ("
            f"SELECT ancestor_run_id FROM run_lineage WHERE run_id IN ({marks}) "
            f"UNION SELECT run_id FROM runs WHERE run_id IN ({marks})) ORDER BY run_id",
            run_ids + run_ids,
        ).fetchall()
    records = []
    for run_id, config in found:
        config = json.loads(config) if isinstance(config, str) else config
        calib = (config or {}).get("calibration") if isinstance(config, dict) else None
        if isinstance(calib, dict) and calib.get("match_key"):
            records.append(
                {
                    "match_key": calib["match_key"],
                    "heldout_fraction": calib.get("heldout_fraction"),
                    "run_id": run_id,
                }
            )
    return records
