"""Pieces every stage shares: model options, loading a model for a run, stored evaluations."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput

if TYPE_CHECKING:
    from cwa.lifecycle import RunContext
    from cwa.models.loading import LoadedModel
    from cwa.progress import Reporter
    from cwa.store import Store


@dataclass
class ModelOptions:
    """How to load the model a stage works on."""

    ref: str = "toy"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def to_config(self) -> dict[str, Any]:
        return asdict(self)


def is_toy_ref(ref: str | None) -> bool:
    return bool(ref) and ref.split(":")[0] in ("toy", "toy-gpt2", "toy-llama")


def load_for_run(
    ctx: RunContext,
    options: ModelOptions,
    *,
    attn_implementation: str | None = None,
    reporter: Reporter | None = None,
) -> LoadedModel:
    """Load the model and record its reference, fingerprint and device on the run."""
    from cwa.models.loading import load_model

    loaded = load_model(
        options.ref,
        dtype=options.dtype,
        device=options.device,
        trust_remote_code=options.trust_remote_code,
        attn_implementation=attn_implementation,
        reporter=reporter or ctx.reporter,
    )
    ctx.set_model(options.ref, loaded.fingerprint, loaded.device)
    return loaded


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
