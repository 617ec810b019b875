"""The ``perturb`` stage: perturb the ranked weights in place against matched controls.

One perturb run holds one condition per (selection, method, scale, k, seed). For every condition
the selected weights are changed in place (only their originals are saved), the model is
evaluated, and the weights are restored and verified bit-exact by checksum before the next
condition; a mismatch fails the run. Controls draw from exactly the scope the ranking covered
(same tensors, components and layers, narrowed further by ``--components/--layers/--heads``):

* ``top_k``: the k best-ranked weights in scope (the treatment);
* ``random_k``: k weights uniformly without replacement from the scope, seeded (may overlap the
  treatment by chance, as an honest random draw does);
* ``bottom_k``: the k in-scope weights with the smallest scores, exact-zero scores excluded;
* ``all_k``: every weight in the scope (an upper bound on the damage; its k is the scope size).

The unperturbed baseline is evaluated once (or reused from a stored evaluation of the same
model fingerprint and task config) and stored in the run with ``condition_id`` NULL, so the
``perturbation_effects`` view can put every condition next to it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from cwa.errors import InvalidInput, UsageError
from cwa.lifecycle import RunContext, RunOutcome, StageOutput, StageRequest, execute_stage
from cwa.progress import NULL_REPORTER, Reporter
from cwa.stages.common import check_positive, is_toy_ref, stored_evaluation
from cwa.stages.evaluate import evaluate_plans
from cwa.stages.rank import load_source_model
from cwa.stages.score import SCORE_FILE
from cwa.store import Store
from cwa.store.runs import RunRecord, fetch_run, resolve_run_id

SELECTION_ORDER = ("top_k", "random_k", "bottom_k", "all_k")
_STOCHASTIC_METHODS = {"gaussian_noise"}
_SCALED_METHODS = {"scale", "gaussian_noise"}


@dataclass
class PerturbConfig:
    rank_run: str = "latest"
    method: str = "sign_flip"
    scales: list[float] | None = None
    bit: int | None = None
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    seeds: list[int] = field(default_factory=lambda: [0])
    k_values: list[int] | None = None  # default: every ranked row of the rank run
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


@dataclass
class Condition:
    selection: str
    method: str
    scale: float | None
    bit: int | None
    k: int
    seed: int | None

    @property
    def condition_id(self) -> str:
        parts = [self.selection, self.method, f"k={self.k}"]
        if self.scale is not None:
            parts.append(f"s={self.scale:g}")
        if self.bit is not None:
            parts.append(f"bit={self.bit}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return "|".join(parts)


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


def validate_config(config: PerturbConfig) -> None:
    """Checks that need neither the store nor the model (run before anything is opened)."""
    from cwa.perturbation import PERTURBATION_METHODS, SELECTIONS

    config.method = PERTURBATION_METHODS.canonical(config.method)
    for control in config.controls:
        SELECTIONS.canonical(control)
        if control == "top_k":
            raise InvalidInput(
                "top_k is the treatment and always runs; list only controls in "
                "--controls (random_k, bottom_k, all_k)"
            )
    if config.method in _SCALED_METHODS:
        if config.method == "scale" and not config.scales:
            raise UsageError("--method scale needs --scale S (or --scales 0.5,1,2)")
    elif config.scales:
        raise UsageError(f"--method {config.method} takes no --scale")
    if config.bit is not None and config.method != "bit_flip":
        raise UsageError("--bit applies only to --method bit_flip")
    for k in config.k_values or []:
        check_positive("k-values", k)
    for scale in config.scales or []:
        if not math.isfinite(scale):
            raise InvalidInput(f"--scale {scale} is not a finite number")
        if config.method == "gaussian_noise" and scale < 0:
            raise InvalidInput("--scale for gaussian_noise is a noise level and must be >= 0")
    if config.bit is not None and not 0 <= config.bit <= 31:
        raise InvalidInput(f"--bit {config.bit} is out of range; use 0-31 (0-15 for 16-bit dtypes)")
    if not config.seeds:
        raise InvalidInput("--seeds is empty; give at least one seed")
    check_positive("batch-size", config.batch_size)
    if config.limit is not None:
        check_positive("limit", config.limit)


def conditions_for(config: PerturbConfig, k_values: list[int]) -> list[Condition]:
    """Every condition of the sweep, treatment first within each (k, scale)."""
    scales: list[float | None] = list(config.scales) if config.scales else [None]
    if config.method == "gaussian_noise" and not config.scales:
        scales = [1.0]
    selections = ["top_k", *[c for c in SELECTION_ORDER if c in config.controls and c != "top_k"]]
    out: list[Condition] = []
    for k in k_values:
        for scale in scales:
            for selection in selections:
                seeded = selection == "random_k" or config.method in _STOCHASTIC_METHODS
                for seed in config.seeds if seeded else [None]:
                    if selection == "all_k" and k != k_values[0]:
                        continue  # all_k does not depend on k: once per scale is enough
                    out.append(Condition(selection, config.method, scale, config.bit, k, seed))
    return out


def _scope(arch: Any, score_run: RunRecord, rank_run: RunRecord, config: PerturbConfig) -> Any:
    """The weights the ranking covered, narrowed by the targeted options."""
    from cwa.perturbation.scope import scope_from_architecture

    def narrowed(*lists: list | None) -> list | None:
        present = [set(x) for x in lists if x]
        if not present:
            return None
        common = set.intersection(*present)
        if not common:
            raise InvalidInput(
                "the requested layers/components do not overlap the ranking's "
                "scope; nothing would be perturbed"
            )
        return sorted(common)

    from cwa.models.architecture import resolve_components

    def comps(x: list[str] | None) -> list[str] | None:
        return None if not x else list(resolve_components(x))

    layers = narrowed(score_run.config.get("layers"), rank_run.config.get("layers"), config.layers)
    components = narrowed(
        comps(score_run.config.get("components")),
        comps(rank_run.config.get("components")),
        comps(config.components),
    )
    heads = config.heads
    if heads is None and rank_run.config.get("mode") == "head":
        # A head ranking covers only attention-head elements: so must the controls.
        layer_ids = layers if layers is not None else range(arch.n_layers)
        heads = [(layer, h) for layer in layer_ids for h in range(arch.n_heads)]
        if components is None:
            components = ["attn_q", "attn_k", "attn_v", "attn_o"]
    return (
        scope_from_architecture(arch, layers=layers, components=components, heads=heads),
        layers,
        components,
        heads,
    )


def _treatment_rows(store: Store, rank_id: str) -> Any:
    import polars as pl

    with store.read() as con:
        frame = con.execute(
            "SELECT group_key, rank, parameter, flat_index FROM ranked_weights "
            "WHERE run_id = ? ORDER BY rank, rowid",
            [rank_id],
        ).fetchall()
    return pl.DataFrame(
        frame, schema=["group_key", "rank", "parameter", "flat_index"], orient="row"
    )


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
        if entry.mask is None:
            keep[rows] = True
        else:
            keep[rows] = entry.mask.numpy()[flat[rows]]
    return frame.filter(pl.Series(keep))


def run_perturb(
    store: Store,
    config: PerturbConfig,
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
    loaded: Any = None,
) -> RunOutcome:
    reporter = reporter or NULL_REPORTER
    validate_config(config)
    with store.read() as con:
        rank_id = resolve_run_id(con, config.rank_run, stage="rank", store_label=store.label)
        rank_run = fetch_run(con, rank_id)
        score_id = next((p for p, role in rank_run.parents if role == "scores"), None)
        if score_id is None:
            raise InvalidInput(f"rank run {rank_id} records no score run")
        score_run = fetch_run(con, score_id)
    if rank_run.status != "succeeded":
        raise InvalidInput(f"rank run {rank_id} is {rank_run.status}; perturb a succeeded run")
    mode = rank_run.config.get("mode", "global")
    with store.read() as con:
        (n_ranked,) = con.execute(
            "SELECT count(*) FROM ranked_weights WHERE run_id = ?", [rank_id]
        ).fetchone()
    if mode != "global" and config.k_values:
        raise InvalidInput(
            f"rank run {rank_id} is a per-{mode} ranking; its treatment is every ranked weight "
            f"({n_ranked}). Progressive --k-values sweeps need a global ranking (cwa rank --mode "
            "global)"
        )
    # Global: the top k; per-group modes: the union of every group's top k.
    k_values = sorted(set(config.k_values or [int(n_ranked)]))
    if k_values[-1] > n_ranked:
        raise InvalidInput(
            f"rank run {rank_id} holds the top {n_ranked} weights but k="
            f"{k_values[-1]} was asked; re-rank with --topk {k_values[-1]}"
        )
    if rank_run.config.get("bottom"):
        raise InvalidInput(
            f"rank run {rank_id} ranks the bottom weights; perturb a top-k "
            "ranking (the bottom_k control is built in)"
        )
    from cwa.evaluation.tasks import plan_tasks

    plans = plan_tasks(
        config.tasks,
        limit=config.limit,
        seed=config.eval_seed,
        is_toy_model=is_toy_ref(score_run.model_ref),
    )
    names = [plan.task for plan in plans]
    if len(set(names)) != len(names):
        raise InvalidInput(
            "a task appears twice in --eval; evaluate one source per task in a perturb run"
        )
    parents = [(rank_id, "ranking")]
    if score_run.model_fingerprint:  # stored baselines this run will reuse are its inputs too
        for plan in plans:
            stored = stored_evaluation(store, score_run.model_fingerprint, plan.config_hash)
            if stored is not None and (stored[0], "baseline") not in parents:
                parents.append((stored[0], "baseline"))
    run_config = asdict(config)
    run_config.update(rank_run=rank_id, score_run=score_id, k_values=k_values)
    run_config.pop("command")
    request = StageRequest(
        stage="perturb",
        config=run_config,
        experiment=config.experiment or rank_run.experiment,
        parents=parents,
        model_ref=rank_run.model_ref,
        seed=score_run.seed,
        command=config.command,
    )

    def compute(ctx: RunContext) -> StageOutput:
        return _sweep(ctx, store, config, rank_id, rank_run, score_run, k_values, plans, loaded)

    return execute_stage(store, request, compute, reporter=reporter, mlflow=mlflow)


def _sweep(
    ctx: RunContext,
    store: Store,
    config: PerturbConfig,
    rank_id: str,
    rank_run: RunRecord,
    score_run: RunRecord,
    k_values: list[int],
    plans: list[Any],
    preloaded: Any = None,
) -> StageOutput:
    from cwa.evaluation.runner import evaluate_model
    from cwa.perturbation.apply import perturbed
    from cwa.perturbation.checksum import named_checksums
    from cwa.perturbation.selection import all_k, bottom_k, random_k, top_k
    from cwa.scorefile import open_scores

    reporter = ctx.reporter
    loaded = load_source_model(
        store, score_run, device=config.device, reporter=reporter, loaded=preloaded
    )
    ctx.set_model(score_run.model_ref, loaded.fingerprint, loaded.device)
    model = loaded.model
    scope, layers, components, heads = _scope(loaded.arch, score_run, rank_run, config)
    # Only tensors the score run scored were ranked (wanda and super_weight score a subset).
    from cwa.scorefile import read_score_header

    scored, _ = read_score_header(store.artifacts_dir(score_run.run_id) / SCORE_FILE)
    scope = [entry for entry in scope if entry.name in scored]
    if not scope:
        raise InvalidInput(
            "no scored tensor lies in the requested scope; widen --layers/--components/--heads"
        )
    scope_record = {
        "layers": layers,
        "components": components,
        "heads": heads,
        "n_weights": int(sum(entry.count for entry in scope)),
    }
    ctx.record_config(scope=scope_record)
    ranking = _in_scope(_treatment_rows(store, rank_id), scope)
    if ranking.height == 0:
        raise InvalidInput(
            "no ranked weight lies in the requested scope; widen "
            "--layers/--components/--heads or re-rank within them"
        )

    def evaluate() -> list[dict[str, Any]]:
        return evaluate_model(
            model, loaded.tokenizer, plans, batch_size=config.batch_size, reporter=reporter
        )

    # Baseline: reused from a stored evaluation of this exact model and task config when there
    # is one (recorded as a 'baseline' parent), evaluated here otherwise.
    rows = evaluate_plans(
        loaded, plans, store=store, batch_size=config.batch_size, force=False, reporter=reporter
    )

    touched = [e.name for e in scope]
    params = dict(model.named_parameters())
    baseline_checksums = named_checksums({n: params[n] for n in touched})
    conditions = conditions_for(config, k_values)
    condition_rows: list[dict[str, Any]] = []
    task = reporter.task("perturbation conditions", len(conditions))
    try:
        for cond in conditions:
            if cond.selection == "top_k":
                if ranking.height < cond.k:
                    raise InvalidInput(
                        f"only {ranking.height} ranked weights lie in scope, fewer than k={cond.k}"
                    )
                head = ranking.head(cond.k)
                selection = top_k(head["parameter"].to_list(), head["flat_index"].to_list())
            elif cond.selection == "random_k":
                selection = random_k(scope, cond.k, cond.seed or 0)
            elif cond.selection == "bottom_k":
                score_path = store.artifacts_dir(score_run.run_id) / SCORE_FILE
                with open_scores(score_path) as reader:
                    selection = bottom_k(
                        ((e.name, reader.get(e.name)) for e in scope), scope, cond.k
                    )
            else:
                selection = all_k(scope)
            with perturbed(
                model,
                selection,
                cond.method,
                scale=cond.scale,
                bit=cond.bit,
                seed=cond.seed or 0,
                baseline_checksums={n: baseline_checksums[n] for n in selection},
                reporter=reporter,
            ) as handle:
                results = evaluate()
            record = handle.record()
            condition_rows.append(
                {
                    "condition_id": cond.condition_id,
                    "selection": cond.selection,
                    "method": cond.method,
                    "scale": cond.scale,
                    "bit": record["bit"],
                    "k": int(selection.k),
                    "seed": cond.seed,
                    "n_changed": record["n_changed"],
                    "scope": scope_record,
                    "checksum_before": record["checksum_before"],
                    "checksum_after": record["checksum_after"],
                    "restored": record["restored"],
                }
            )
            rows += [{**r, "reused_from": None, "condition_id": cond.condition_id} for r in results]
            task.advance()
    finally:
        task.close()
    after = named_checksums({n: params[n] for n in touched})
    if after != baseline_checksums:  # belt and braces: the whole scope is as it was
        from cwa.errors import RestoreError

        raise RestoreError("the model differs from its baseline after the sweep; discard it")
    for row in rows:
        row["model_fingerprint"] = loaded.fingerprint
    summary = summarize(rows, condition_rows)
    metrics = {"n_conditions": float(len(condition_rows))}
    for (selection, task_name, metric), stats in summary.items():
        metrics[f"{selection}.{task_name}.{metric}.mean"] = stats["mean"]
    return StageOutput(
        tables={"evaluations": rows, "perturbation_conditions": _conditions_frame(condition_rows)},
        metrics=metrics,
        value={"summary": summary, "conditions": condition_rows, "rows": rows},
    )


def _conditions_frame(rows: list[dict[str, Any]]) -> Any:
    import json

    import polars as pl

    return pl.DataFrame(
        [{**r, "scope": json.dumps(r["scope"])} for r in rows],
        schema={
            "condition_id": pl.String,
            "selection": pl.String,
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


def summarize(
    rows: list[dict[str, Any]], conditions: list[dict[str, Any]]
) -> dict[tuple[str, str, str], dict[str, float]]:
    """Per (selection, task, metric): mean, std over seeds, min, max, baseline, mean ratio."""
    import statistics

    by_condition = {c["condition_id"]: c for c in conditions}
    baseline = {(r["task"], r["metric"]): r["value"] for r in rows if r["condition_id"] is None}
    grouped: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        cond = by_condition.get(r["condition_id"])
        if cond is None:
            continue
        key = (
            cond["selection"]
            + (
                f".k{cond['k']}"
                if len({c["k"] for c in conditions}) > 1 and cond["selection"] != "all_k"
                else ""
            )
            + (
                f".s{cond['scale']:g}"
                if cond["scale"] is not None and len({c["scale"] for c in conditions}) > 1
                else ""
            ),
            r["task"],
            r["metric"],
        )
        grouped.setdefault(key, []).append(float(r["value"]))
    out = {}
    for key, values in grouped.items():
        base = baseline.get((key[1], key[2]))
        mean = statistics.fmean(values)
        out[key] = {
            "mean": mean,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "n": float(len(values)),
            "baseline": float("nan") if base is None else float(base),
            "ratio": float("nan") if not base else mean / base,
        }
    return out
