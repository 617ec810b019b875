"""The ``evaluate`` stage: perplexity, HellaSwag and LAMBADA on a plain model.

Results go to the ``evaluations`` table (condition NULL) and, per item, to
``evaluation_items`` (unless ``items=False``). A task whose exact config was already evaluated
in this store -- same evaluation key (weights, config, tokenizer, BOS, dtype, attention,
engine version: :mod:`cwa.evaluation.identity`) and same task config hash -- is reused rather
than recomputed, unless ``force`` is set; reused rows name the run they came from.

Perplexity on a file scores the whole file, unless the file is the calibration text of the
run named by ``from_run`` / ``calibration_run`` (or one of its ancestors): then only its
held-out tail is scored and the row's ``note`` says so (``heldout_fraction`` forces that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cwa.errors import InvalidInput, UsageError
from cwa.lifecycle import RunContext, RunOutcome, StageOutput
from cwa.progress import Reporter
from cwa.stages.common import (
    ModelOptions,
    calibration_records,
    check_positive,
    is_toy_ref,
    stored_evaluation,
)
from cwa.stages.setup import stage_request
from cwa.store import Store
from cwa.store.runs import fetch_run, resolve_run_id

DEFAULT_TASKS = "perplexity,hellaswag,lambada"


@dataclass
class EvaluateConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    from_run: str | None = None  # evaluate the model another run used
    tasks: str = DEFAULT_TASKS
    limit: int | None = None
    batch_size: int = 16
    seed: int = 0
    seq_len: int | None = None
    stride: int | None = None
    text_column: str | None = None
    force: bool = False
    experiment: str = "default"
    command: str | None = None
    items: bool = True  # per-item records in evaluation_items
    heldout_fraction: float | None = None  # force held-out scoring of perplexity texts
    calibration_run: str | None = None  # a run whose calibration text perplexity holds out


def plan_for(config: EvaluateConfig, calibration: list[dict[str, Any]] | None = None) -> list[Any]:
    """Resolve and validate the task specs (sources located and hashed) without a model."""
    from cwa.evaluation.tasks import plan_tasks

    return plan_tasks(
        config.tasks,
        heldout_fraction=config.heldout_fraction,
        calibration=calibration or [],
        limit=config.limit,
        seed=config.seed,
        seq_len=config.seq_len,
        stride=config.stride,
        is_toy_model=is_toy_ref(config.model.ref),
        text_column=config.text_column,
    )


def evaluate_plans(
    loaded: Any,
    plans: list[Any],
    *,
    store: Store,
    batch_size: int,
    force: bool,
    reporter: Reporter,
    items: Any = None,
) -> list[dict[str, Any]]:
    """Rows for every planned task: reused from the store when possible, computed otherwise.

    ``items``: an :class:`~cwa.evaluation.records.ItemRecorder` that receives the per-item
    records (computed, or copied from the run whose result is reused).
    """
    from cwa.evaluation.identity import evaluation_key
    from cwa.evaluation.records import ItemRecorder

    recorder = items if items is not None else ItemRecorder(enabled=False)
    key = evaluation_key(loaded)
    rows: list[dict[str, Any]] = []
    for plan in plans:
        stored = (
            None if force else stored_evaluation(store, loaded.fingerprint, plan.config_hash, key)
        )
        if stored is not None:
            source_run, stored_rows = stored
            reporter.info(
                f"{plan.task}: reusing results of run {source_run} (use --force to recompute)"
            )
            rows += [{**row, "reused_from": source_run} for row in stored_rows]
            recorder.copy_stored(store, source_run, plan.config_hash)
            continue
        for row in recorder.evaluate(
            loaded.model,
            loaded.tokenizer,
            [plan],
            condition_id=None,
            batch_size=batch_size,
            reporter=reporter,
        ):
            rows.append({**row, "reused_from": None})
    for row in rows:
        row["condition_id"] = None
        row["model_fingerprint"] = loaded.fingerprint
        row["eval_key"] = key
    return rows


def run_evaluate(
    store: Store,
    config: EvaluateConfig,
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
    loaded: Any = None,
) -> RunOutcome:
    check_positive("batch-size", config.batch_size)
    if config.limit is not None:
        check_positive("limit", config.limit)
    parents: list[tuple[str, str]] = []
    if config.from_run is not None:
        with store.read() as con:
            run_id = resolve_run_id(con, config.from_run, store_label=store.label)
            source = fetch_run(con, run_id)
        if not source.model_ref:
            raise UsageError(f"run {run_id} records no model; pass --model instead")
        # The same model as that run: reference, dtype and remote-code setting, and (checked
        # below) the same weights.
        recorded = source.config.get("model") if isinstance(source.config, dict) else None
        if isinstance(recorded, dict):
            config.model.dtype = recorded.get("dtype", config.model.dtype)
            config.model.trust_remote_code = bool(
                recorded.get("trust_remote_code", config.model.trust_remote_code)
            )
        config.model.ref = source.model_ref
        parents.append((run_id, "model"))
    calibration_ids = [p for p, _ in parents]
    if config.calibration_run is not None:
        with store.read() as con:
            calib_id = resolve_run_id(con, config.calibration_run, store_label=store.label)
        calibration_ids.append(calib_id)
    plans = plan_for(config, calibration_records(store, calibration_ids))
    from cwa.stages.tasks_check import check_task_files

    check_task_files(plans)  # a malformed task file fails here, before a run is registered
    if loaded is None:  # load before registering: a bad model reference leaves no run behind
        from cwa.models.loading import load_model

        loaded = load_model(
            config.model.ref,
            dtype=config.model.dtype,
            device=config.model.device,
            trust_remote_code=config.model.trust_remote_code,
            reporter=reporter,
            device_map=config.model.device_map,
        )
    if config.from_run is not None and source.model_fingerprint not in (None, loaded.fingerprint):
        raise InvalidInput(
            f"model {source.model_ref!r} has changed since run {run_id} used it (fingerprint "
            f"{loaded.fingerprint[:12]} now, {source.model_fingerprint[:12]} then)"
        )
    request = stage_request(
        "evaluate",
        config,
        parents=parents,
        experiment=config.experiment,
        model_ref=config.model.ref,
        seed=config.seed,
    )

    def compute(ctx: RunContext) -> StageOutput:
        from cwa.evaluation.identity import evaluation_identity
        from cwa.evaluation.records import ItemRecorder

        model = loaded
        ctx.set_model(config.model.ref, model.fingerprint, model.device)
        recorder = ItemRecorder(enabled=config.items)
        rows = evaluate_plans(
            model,
            plans,
            store=store,
            batch_size=config.batch_size,
            force=config.force,
            reporter=ctx.reporter,
            items=recorder,
        )
        ctx.record_config(evaluation_identity=evaluation_identity(model))
        metrics = {f"{r['task']}.{r['metric']}": r["value"] for r in rows}
        tables = {"evaluations": rows, **recorder.tables()}
        return StageOutput(tables=tables, metrics=metrics, value=rows)

    from cwa.distributed import run_stage  # execute_stage on every rank of a torchrun world

    return run_stage(store, request, compute, reporter=reporter, mlflow=mlflow)
