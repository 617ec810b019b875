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

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cwa.errors import InvalidInput, UsageError
from cwa.lifecycle import RunContext, RunOutcome, StageOutput
from cwa.progress import NULL_REPORTER, Reporter
from cwa.stages.common import (
    calibration_records,
    check_positive,
    is_toy_ref,
    stored_evaluation,
)
from cwa.stages.setup import load_source_model, stage_request
from cwa.store import Store
from cwa.store.runs import RunRecord

# Re-exported for callers of the old module layout.
from cwa.perturbation.sweep import Condition, summarize  # noqa: E402,F401  isort: skip


@dataclass
class PerturbConfig:
    rank_run: str = "latest"
    method: str = "sign_flip"
    scales: list[float] | None = None
    bit: int | None = None
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    seeds: list[int] = field(default_factory=lambda: [0])
    k_values: list[int] | None = None  # default: every ranked row in scope
    layers: list[int] | None = None
    components: list[str] | None = None
    heads: list[tuple[int, int]] | None = None
    tasks: str = "perplexity"
    limit: int | None = None
    batch_size: int = 16
    eval_seed: int = 0
    device: str = "auto"
    experiment: str | None = None
    command: str | None = None
    items: bool = True  # per-item records in evaluation_items (issue 9; --no-items)
    treatment: str = "top_k"


def parse_heads(text: str | None) -> list[tuple[int, int]] | None:
    """'3.1,5.0' -> [(3, 1), (5, 0)] (layer.head)."""
    if text is None or not text.strip():
        return None
    heads = []
    for part in text.split(","):
        layer, dot, head = part.strip().partition(".")
        if not dot or not layer.isdigit() or not head.isdigit():
            raise InvalidInput(f"cannot read head {part.strip()!r}; write LAYER.HEAD like 3.1")
        heads.append((int(layer), int(head)))
    return heads


@dataclass
class CheckedOptions:
    method: Any  # PerturbationMethod
    treatment: Any  # ParsedSelection
    controls: list[Any]  # ParsedSelection


def validate_config(config: PerturbConfig) -> CheckedOptions:
    """Checks that need neither the store nor the model (run before anything is opened)."""
    from cwa.perturbation.apply import get_method
    from cwa.perturbation.contract import parse_selection

    method = get_method(config.method)
    config.method = method.name
    treatment = parse_selection(config.treatment)
    if treatment.spec.role != "treatment":
        raise InvalidInput(
            f"{treatment.label!r} is a control, not a treatment; put it in --controls"
        )
    controls = []
    for text in config.controls:
        parsed = parse_selection(text)
        if parsed.spec.role != "control":
            raise InvalidInput(
                f"{parsed.label!r} is a treatment and always runs as --treatment; list only "
                "controls in --controls (random_k, bottom_k, all_k or a plugin)"
            )
        if parsed.label in {c.label for c in controls}:
            raise InvalidInput(f"control {parsed.label!r} is listed twice in --controls")
        controls.append(parsed)
    if method.requires_scale and not config.scales:
        raise UsageError(f"--method {method.name} needs --scale S (or --scales 0.5,1,2)")
    if config.scales and not method.takes_scale:
        raise UsageError(f"--method {method.name} takes no --scale")
    if config.bit is not None and not method.takes_bit:
        raise UsageError(
            f"--bit applies only to methods that flip a bit (bit_flip), not {method.name}"
        )
    for k in config.k_values or []:
        check_positive("k-values", k)
    for scale in config.scales or []:
        if not math.isfinite(scale):
            raise InvalidInput(f"--scale {scale} is not a finite number")
        if method.nonnegative_scale and scale < 0:
            raise InvalidInput(f"--scale for {method.name} is a level and must be >= 0")
    if config.bit is not None and config.bit < 0:
        raise InvalidInput(f"--bit {config.bit} is negative; bits count from 0")
    if not config.seeds:
        raise InvalidInput("--seeds is empty; give at least one seed")
    check_positive("batch-size", config.batch_size)
    if config.limit is not None:
        check_positive("limit", config.limit)
    return CheckedOptions(method, treatment, controls)


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


def _narrowed(*lists: list | None) -> list | None:
    present = [set(x) for x in lists if x]
    if not present:
        return None
    common = set.intersection(*present)
    if not common:
        raise InvalidInput(
            "the requested layers/components do not overlap the ranking's scope; nothing "
            "would be perturbed: pick layers/components the rank run covered"
        )
    return sorted(common)


def _scope(arch: Any, score_run: RunRecord, rank_run: RunRecord, config: PerturbConfig) -> Any:
    """The weights the ranking covered, narrowed by the targeted options (checked on ``arch``)."""
    from cwa.models.architecture import resolve_components
    from cwa.perturbation.scope import scope_from_architecture

    def comps(x: list[str] | None) -> list[str] | None:
        return None if not x else list(resolve_components(x))

    for layer in config.layers or []:
        arch._check_layer(layer)  # a layer the model does not have: say so
    layers = _narrowed(score_run.config.get("layers"), rank_run.config.get("layers"), config.layers)
    components = _narrowed(
        comps(score_run.config.get("components")),
        comps(rank_run.config.get("components")),
        comps(config.components),
    )
    heads = config.heads
    for layer, head in heads or []:
        arch._check_layer(layer)
        arch._check_head(head, max(arch.n_heads, arch.n_kv_heads))
    if heads is None and rank_run.config.get("mode") == "head":
        # A head ranking covers only attention-head elements: so must the controls.
        layer_ids = layers if layers is not None else range(arch.n_layers)
        heads = [(layer, h) for layer in layer_ids for h in range(arch.n_heads)]
        if components is None:
            components = ["attn_q", "attn_k", "attn_v", "attn_o"]
    scope = scope_from_architecture(arch, layers=layers, components=components, heads=heads)
    record = {"layers": layers, "components": components, "heads": heads}
    return scope, record


def _in_scope(frame: Any, scope: list[Any]) -> Any:
    """Keep ranking rows whose weight lies in the scope (vectorised per parameter)."""
    import numpy as np
    import polars as pl

    keep = np.zeros(frame.height, dtype=bool)
    names = frame["parameter"].to_numpy()
    flat = frame["flat_index"].to_numpy()
    for entry in scope:
        rows = np.flatnonzero(names == entry.name)
        if rows.size == 0:
            continue
        keep[rows] = True if entry.mask is None else entry.mask.numpy()[flat[rows]]
    return frame.filter(pl.Series(keep))


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
    from cwa.scorefile import read_score_header
    from cwa.stages.score import SCORE_FILE
    from cwa.store.results import count_ranked, parent_run, ranked_rows, succeeded_run

    options = validate_config(config)
    rank_run = succeeded_run(store, config.rank_run, "rank")
    score_run = parent_run(store, rank_run, "scores")
    rank_id = rank_run.run_id
    if rank_run.config.get("bottom"):
        raise InvalidInput(
            f"rank run {rank_id} ranks the bottom weights; perturb a top-k ranking (the "
            "bottom_k control is built in)"
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
        store, score_run, device=config.device, reporter=reporter, loaded=loaded
    )
    arch = loaded.arch
    scope, scope_record = _scope(arch, score_run, rank_run, config)
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
    ranking = _in_scope(ranked_rows(store, rank_id), scope)
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
    from cwa.perturbation.sweep import SweepInputs, plan_conditions, run_sweep
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
            "perturbation_conditions": _conditions_frame(result.conditions),
            "condition_groups": _groups_frame(result.groups),
            **items.tables(result.conditions),
        },
        metrics=metrics,
        value={"summary": summary, "conditions": result.conditions, "rows": rows},
    )


def _conditions_frame(rows: list[dict[str, Any]]) -> Any:
    import json

    import polars as pl

    return pl.DataFrame(
        [{**r, "scope": json.dumps(r["scope"])} for r in rows],
        schema={
            "condition_id": pl.String,
            "selection": pl.String,
            "role": pl.String,
            "method": pl.String,
            "scale": pl.Float64,
            "bit": pl.Int64,
            "k": pl.Int64,
            "seed": pl.Int64,
            "n_changed": pl.Int64,
            "scope": pl.String,
            "checksum_before": pl.String,
            "checksum_after": pl.String,
            "restored": pl.Boolean,
        },
    )


def _groups_frame(rows: list[dict[str, Any]]) -> Any:
    import polars as pl

    return pl.DataFrame(
        rows, schema={"condition_id": pl.String, "group_key": pl.String, "k": pl.Int64}
    )
