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


def is_toy_ref(ref: str | None) -> bool:
    return bool(ref) and ref.split(":")[0] in ("toy", "toy-gpt2", "toy-llama")


def check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and (isinstance(value, bool) or value < minimum):
        raise InvalidInput(f"--{name} must be at least {minimum}, got {value}")


def stored_evaluation(
    store: Store, fingerprint: str, task_config_hash: str
) -> tuple[str, list[dict[str, Any]]] | None:
    """The newest succeeded evaluation of this exact model and task config, if any.

    Matches plain-model rows (condition_id NULL) from evaluate runs and from the baselines that
    perturb runs record. Returns (run id, rows).
    """
    with store.read() as con:
        found = con.execute(
            "SELECT e.run_id FROM evaluations e JOIN runs r ON r.run_id = e.run_id "
            "WHERE r.status = 'succeeded' AND e.condition_id IS NULL "
            "AND e.model_fingerprint = ? AND e.task_config_hash = ? "
            "ORDER BY e.run_id DESC LIMIT 1",
            [fingerprint, task_config_hash],
        ).fetchone()
        if found is None:
            return None
        rows = con.execute(
            "SELECT task, metric, value, stderr, n, task_config_hash FROM evaluations "
            "WHERE run_id = ? AND condition_id IS NULL AND task_config_hash = ? "
            "ORDER BY rowid",
            [found[0], task_config_hash],
        ).fetchall()
    keys = ("task", "metric", "value", "stderr", "n", "task_config_hash")
    return str(found[0]), [dict(zip(keys, row, strict=True)) for row in rows]
