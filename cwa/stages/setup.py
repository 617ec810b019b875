"""Setup every stage repeats, in one place: input runs, the source model, the run request.

A stage is validate -> register -> compute -> write (:func:`cwa.lifecycle.execute_stage`).
Everything here belongs to *validate*: it reads the store and may load the model, but registers
nothing, so a refused option leaves the runs table as it was. A new stage is one library module
that calls these helpers, builds a :class:`~cwa.lifecycle.StageRequest` with
:func:`stage_request` and hands its compute function to ``execute_stage``, plus one CLI module.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput
from cwa.lifecycle import StageRequest
from cwa.progress import Reporter

if TYPE_CHECKING:
    from cwa.store import Store
    from cwa.store.runs import RunRecord


def load_source_model(
    store: Store,
    run: RunRecord,
    *,
    device: str,
    reporter: Reporter,
    loaded: Any = None,
    device_map: str | None = None,
    stage: str = "this stage",
) -> Any:
    """Reload the model a run used (or take ``loaded``) and check it has the same weights.

    ``device_map`` (``auto``/``balanced``/FILE.json) spreads it over devices; weights it
    offloads are refused (the callers edit weights or read them in place).
    """
    if loaded is not None:
        if run.model_fingerprint and loaded.fingerprint != run.model_fingerprint:
            raise InvalidInput(
                f"the model given is not the one run {run.run_id} used (fingerprint "
                f"{loaded.fingerprint[:12]} vs {run.model_fingerprint[:12]})"
            )
        return loaded
    from cwa.models.loading import load_model

    model_cfg = run.config.get("model", {})
    loaded = load_model(
        run.model_ref or model_cfg.get("ref"),
        dtype=model_cfg.get("dtype", "auto"),
        device=device,
        trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
        reporter=reporter,
        device_map=device_map,
    )
    from cwa.models.device_map import require_materialized

    require_materialized(loaded.model, stage)
    if run.model_fingerprint and loaded.fingerprint != run.model_fingerprint:
        raise InvalidInput(
            f"model {run.model_ref!r} has changed since run {run.run_id} used it (fingerprint "
            f"{loaded.fingerprint[:12]} now, {run.model_fingerprint[:12]} then); re-run the "
            "score stage on the current weights"
        )
    return loaded


def stage_request(
    stage: str,
    config: Any,
    *,
    parents: list[tuple[str, str]],
    experiment: str | None,
    source: RunRecord | None = None,
    model_ref: str | None = None,
    seed: int | None = None,
    omit: tuple[str, ...] = (),
    overrides: dict[str, Any] | None = None,
    **effective: Any,
) -> StageRequest:
    """The run request of a stage: its config dataclass as JSON (minus ``command`` and the
    ``omit`` fields) updated with the ``effective`` values resolved while validating (run ids,
    k values, keys, ...; ``overrides`` for names that clash with this function's own);
    experiment, model and seed default to the ``source`` run's."""
    run_config = asdict(config) if is_dataclass(config) else dict(config)
    command = run_config.pop("command", None)
    for name in omit:
        run_config.pop(name, None)
    run_config.update(effective)
    run_config.update(overrides or {})
    return StageRequest(
        stage=stage,
        config=run_config,
        experiment=experiment or (source.experiment if source is not None else "default"),
        parents=parents,
        model_ref=model_ref or (source.model_ref if source is not None else None),
        seed=seed if seed is not None or source is None else source.seed,
        command=command,
    )
