"""The ``perturb`` stage: perturb the ranked weights in place against matched controls.

The stage keeps only the store I/O; the sweep itself (conditions, selections, in-place
perturbation, exact restoration) is :mod:`cwa.perturbation.sweep`.

Validate (nothing registered yet): the method and every selection resolve in their registries
(plugins included); the rank and score runs succeeded; the model is loaded and its architecture
checks ``--layers``/``--components``/``--heads`` against the ranking's scope and ``--bit``
against the weights' dtype; the task files are read; the ranking has weights in scope. Then the
run is registered, the unperturbed baseline evaluated (or reused), the sweep run, and the
results written in one transaction: ``evaluations`` (baseline with ``condition_id`` NULL),
``perturbation_conditions`` and ``condition_groups`` (per condition and group of the rank mode,
the number of weights perturbed: treatment and matched controls side by side, equal).

Selections (see :mod:`cwa.perturbation.contract`): the treatment (``top_k`` by default) and the
controls ``random_k`` (per group, the treatment's count drawn uniformly from that group's
elements, seeded), ``bottom_k`` (per group, the treatment's count of least sensitive weights by
the rank run's key: ``|score|`` for signed metrics; exact-zero scores excluded), ``all_k``
(every weight in scope: an upper bound, not matched), and any registered plugin.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cwa.errors import InvalidInput
from cwa.lifecycle import RunContext, RunOutcome, StageOutput
from cwa.progress import NULL_REPORTER, Reporter
from cwa.stages.common import (
    calibration_records,
    is_toy_ref,
    stored_evaluation,
)
from cwa.stages.perturb_compact import check_compact, compact_plan
from cwa.stages.perturb_options import (  # parse_heads, validate_config: re-exported
    CheckedOptions,
    parse_heads,
    perturb_scope,
    validate_config,
)
from cwa.stages.setup import load_source_model, stage_request
from cwa.store import Store
from cwa.store.runs import RunRecord

# Re-exported for callers of the old module layout.
from cwa.perturbation.sweep import Condition, summarize  # noqa: E402,F401  isort: skip

__all__ = [
    "Condition",
    "PerturbConfig",
    "parse_heads",
    "run_perturb",
    "summarize",
    "validate_config",
]


@dataclass
class PerturbConfig:
    rank_run: str = "latest"
    method: str = "sign_flip"
    scales: list[float] | None = None
    bit: int | None = None
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    seeds: list[int] = field(default_factory=lambda: [0])
    # Numbers or fractions like "10%" of the rank run's candidates (pruning-scale rankings).
    k_values: list[int | str] | None = None  # default: every ranked row in scope
    layers: list[int] | None = None
    components: list[str] | None = None
    heads: list[tuple[int, int]] | None = None
    tasks: str = "perplexity"
    limit: int | None = None
    batch_size: int = 16
    eval_seed: int = 0
    device: str = "auto"
    device_map: str | None = None  # auto|balanced|FILE.json
    experiment: str | None = None
    command: str | None = None
    items: bool = True  # per-item records in evaluation_items (issue 9; --no-items)
    treatment: str = "top_k"
    # Hidden states below the scope's lowest layer computed once per sweep (--no-layer-reuse),
    # kept within this many GiB (cwa.evaluation.layer_reuse).
    layer_reuse: bool = True
    layer_reuse_budget_gb: float = 4.0


@dataclass
class PerturbPlan:
    """Everything validated before the run is registered."""

    options: CheckedOptions
    rank_run: RunRecord
    score_run: RunRecord
    loaded: Any
    scope: list[Any]
    scope_record: dict[str, Any]
    groups: dict[str, list[Any]]
    ranking: Any
    k_values: list[int]
    key: str
    mode: str
    head_grouping: str
    plans: list[Any]
    parents: list[tuple[str, str]]


def ranking_key(rank_run: RunRecord, score_run: RunRecord) -> str:
    """The key the rank run ranked by ("abs" or "value"); runs from before keys were recorded
    ranked by value."""
    return str(rank_run.config.get("by") or "value")


def prepare_perturb(
    store: Store, config: PerturbConfig, *, reporter: Reporter, loaded: Any = None
) -> PerturbPlan:
    """Validate every option against the store, the model and the task files; register nothing."""
    from cwa.evaluation.tasks import plan_tasks
    from cwa.perturbation.contract import SelectionCheck
    from cwa.perturbation.groups import group_scopes
    from cwa.perturbation.scope import rows_in_scope
    from cwa.scorefile import read_score_header
    from cwa.stages.score import SCORE_FILE
    from cwa.store.results import count_ranked, parent_run, ranked_rows, succeeded_run

    options = validate_config(config)
    rank_run = succeeded_run(store, config.rank_run, "rank")
    score_run = parent_run(store, rank_run, "scores")
    rank_id = rank_run.run_id
    from cwa.ranking_prefix import is_fraction, selection_artifact

    compact = selection_artifact(store, rank_run)
    if compact is not None:
        check_compact(rank_run, config, options)
    elif rank_run.config.get("bottom"):
        raise InvalidInput(
            f"rank run {rank_id} ranks the bottom weights; perturb a top-k ranking (the "
            "bottom_k control is built in)"
        )
    elif any(is_fraction(k) for k in config.k_values or []):
        raise InvalidInput(
            f"--k-values fractions need a pruning-scale ranking; rank run {rank_id} stored "
            f"{count_ranked(store, rank_id)} rows: re-rank with cwa rank --topk N%"
        )
    mode = rank_run.config.get("mode", "global")
    if mode != "global" and config.k_values:
        raise InvalidInput(
            f"rank run {rank_id} is a per-{mode} ranking; its treatment is every ranked weight "
            f"({count_ranked(store, rank_id)}). Progressive --k-values sweeps need a global "
            "ranking (cwa rank --mode global)"
        )
    plans = plan_tasks(
        config.tasks,
        limit=config.limit,
        seed=config.eval_seed,
        is_toy_model=is_toy_ref(score_run.model_ref),
        calibration=calibration_records(store, [score_run.run_id]),  # issue 9: hold it out
    )
    names = [plan.task for plan in plans]
    if len(set(names)) != len(names):
        raise InvalidInput("a task appears twice in --eval; evaluate one source per task")
    from cwa.stages.tasks_check import check_task_files

    check_task_files(plans)
    parents = [(rank_id, "ranking")]
    for parsed in [options.treatment, *options.controls]:
        if parsed.spec.check is not None:
            check = SelectionCheck(parsed.name, parsed.param, store, rank_run, score_run, config)
            parents += [p for p in parsed.spec.check(check) or [] if p not in parents]
    if score_run.model_fingerprint:  # stored baselines this run will reuse are its inputs too
        for plan in plans:
            stored = stored_evaluation(store, score_run.model_fingerprint, plan.config_hash)
            if stored is not None and (stored[0], "baseline") not in parents:
                parents.append((stored[0], "baseline"))

    loaded = load_source_model(
        store,
        score_run,
        device=config.device,
        reporter=reporter,
        loaded=loaded,
        device_map=config.device_map,
        stage="perturb",
    )
    arch = loaded.arch
    scope, scope_record = perturb_scope(arch, score_run, rank_run, config)
    # Only tensors the score run scored were ranked (wanda and super_weight score a subset).
    scored, _ = read_score_header(store.artifacts_dir(score_run.run_id) / SCORE_FILE)
    scope = [entry for entry in scope if entry.name in scored]
    if not scope:
        raise InvalidInput(
            "no scored tensor lies in the requested scope; widen --layers/--components/--heads"
        )
    params = dict(loaded.model.named_parameters())
    for dtype in sorted({params[e.name].dtype for e in scope}, key=str):
        options.method.resolve_bit(config.bit, dtype)  # --bit outside the dtype: refused here
    if compact is not None:
        key = ranking_key(rank_run, score_run)
        base = PerturbPlan(options, rank_run, score_run, loaded, scope, scope_record, {}, None,
                           [], key, "global", "kv", plans, parents)  # fmt: skip
        return compact_plan(store, config, base)
    ranking = rows_in_scope(ranked_rows(store, rank_id), scope)
    if ranking.height == 0:
        raise InvalidInput(
            f"no weight ranked by rank run {rank_id} lies in the requested scope (layers "
            f"{scope_record['layers']}, components {scope_record['components']}, heads "
            f"{scope_record['heads']}); pick layers/heads the ranking covers or re-rank within them"
        )
    k_values = sorted(set(config.k_values or [ranking.height]))
    if k_values[-1] > ranking.height:
        raise InvalidInput(
            f"rank run {rank_id} holds {ranking.height} ranked weights in this scope but k="
            f"{k_values[-1]} was asked; lower k or re-rank with --topk {k_values[-1]}"
        )
    head_grouping = rank_run.config.get("head_grouping", "kv")
    return PerturbPlan(
        options=options,
        rank_run=rank_run,
        score_run=score_run,
        loaded=loaded,
        scope=scope,
        scope_record=scope_record,
        groups=group_scopes(arch, scope, mode, head_grouping),
        ranking=ranking,
        k_values=k_values,
        key=ranking_key(rank_run, score_run),
        mode=mode,
        head_grouping=head_grouping,
        plans=plans,
        parents=parents,
    )


def run_perturb(
    store: Store,
    config: PerturbConfig,
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
    loaded: Any = None,
) -> RunOutcome:
    reporter = reporter or NULL_REPORTER
    plan = prepare_perturb(store, config, reporter=reporter, loaded=loaded)
    request = stage_request(
        "perturb",
        config,
        parents=plan.parents,
        experiment=config.experiment,
        source=plan.rank_run,
        seed=plan.score_run.seed,
        rank_run=plan.rank_run.run_id,
        score_run=plan.score_run.run_id,
        k_values=plan.k_values,
        key=plan.key,
        mode=plan.mode,
        head_grouping=plan.head_grouping,
        scope=plan.scope_record,
    )
    from cwa.distributed import run_stage  # execute_stage on every rank of a torchrun world

    return run_stage(
        store,
        request,
        lambda ctx: _compute(ctx, store, config, plan),
        reporter=reporter,
        mlflow=mlflow,
    )


def _score_reader(path: Any) -> Any:
    def read(entries: Sequence[Any]) -> Iterator[tuple[str, Any]]:
        from cwa.scorefile import open_scores

        with open_scores(path) as reader:
            for entry in entries:
                yield entry.name, reader.get(entry.name)

    return read


def _compute(
    ctx: RunContext, store: Store, config: PerturbConfig, plan: PerturbPlan
) -> StageOutput:
    from cwa.evaluation.records import ItemRecorder
    from cwa.perturbation.sweep import (
        SweepInputs,
        conditions_frame,
        groups_frame,
        plan_conditions,
        run_sweep,
    )
    from cwa.stages.evaluate import evaluate_plans
    from cwa.stages.score import SCORE_FILE

    reporter = ctx.reporter
    loaded = plan.loaded
    ctx.set_model(plan.score_run.model_ref, loaded.fingerprint, loaded.device)
    scope_record = {**plan.scope_record, "n_weights": int(sum(e.count for e in plan.scope))}
    ctx.record_config(scope=scope_record)
    # Baseline: reused from a stored evaluation of this exact model and task config when there
    # is one (recorded as a 'baseline' parent), evaluated here otherwise.
    # Per-item records (issue 9): baseline and every condition, unless --no-items.
    items = ItemRecorder(enabled=getattr(config, "items", True))
    rows = evaluate_plans(
        loaded,
        plan.plans,
        store=store,
        batch_size=config.batch_size,
        force=False,
        reporter=reporter,
        items=items,
    )

    def evaluate() -> list[dict[str, Any]]:
        return items.evaluate_condition(
            loaded.model,
            loaded.tokenizer,
            plan.plans,
            batch_size=config.batch_size,
            reporter=reporter,
        )

    options = plan.options
    inputs = SweepInputs(
        model=loaded.model,
        arch=loaded.arch,
        scope=plan.scope,
        groups=plan.groups,
        mode=plan.mode,
        head_grouping=plan.head_grouping,
        key=plan.key,
        ranking=plan.ranking,
        scores=_score_reader(store.artifacts_dir(plan.score_run.run_id) / SCORE_FILE),
        selections={p.label: p for p in [options.treatment, *options.controls]},
        method=options.method,
        store=store,
        rank_run=plan.rank_run,
        score_run=plan.score_run,
        scope_record=plan.scope_record,
        layer_reuse=config.layer_reuse,
        layer_reuse_budget_gb=config.layer_reuse_budget_gb,
    )
    conditions = plan_conditions(
        options.treatment,
        options.controls,
        options.method,
        scales=config.scales,
        bit=config.bit,
        k_values=plan.k_values,
        seeds=config.seeds,
    )
    result = run_sweep(inputs, conditions, evaluate, reporter=reporter)
    ctx.record_config(layer_reuse=result.layer_reuse)
    rows += result.evaluations
    for row in rows:
        row["model_fingerprint"] = loaded.fingerprint
    summary = summarize(rows, result.conditions)
    metrics = {"n_conditions": float(len(result.conditions))}
    for (selection, task_name, metric), stats in summary.items():
        metrics[f"{selection}.{task_name}.{metric}.mean"] = stats["mean"]
    return StageOutput(
        tables={
            "evaluations": rows,
            "perturbation_conditions": conditions_frame(result.conditions),
            "condition_groups": groups_frame(result.groups),
            **items.tables(result.conditions),
        },
        metrics=metrics,
        value={"summary": summary, "conditions": result.conditions, "rows": rows},
    )
