"""A perturbation sweep on an in-memory model: plan the conditions, run them, restore exactly.

The ``perturb`` stage (:mod:`cwa.stages.perturb`) reads its inputs from the store and writes the
results; everything between lives here and needs no store, so it is testable on a tiny model.

One condition per (k, scale, selection, seed): the treatment first within each (k, scale), then
the controls in the order given. A selection is seeded when it is stochastic (``random_k``) or
the method is (``gaussian_noise``); selections with ``depends_on_k=False`` (``all_k``) run once
per scale. For every condition the selection is built through its
:class:`~cwa.perturbation.contract.SelectionSpec`, matched controls are checked to hold exactly
the treatment's count in every group of the rank mode (:mod:`cwa.perturbation.groups`), the
selected weights are perturbed in place, the model is evaluated, and the weights are restored
and verified bit-exact before the next condition.

With a :class:`~cwa.evaluation.layer_reuse.LayerReuse` session, conditions whose selection
touches only decoder layers >= L replay the hidden states below L captured during the first
such condition's own evaluation (the numbers of a full forward; see that module).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cwa.errors import InvalidInput, RestoreError
from cwa.perturbation.contract import ParsedSelection, SelectionRequest
from cwa.progress import NULL_REPORTER, Reporter


@dataclass(frozen=True)
class Condition:
    """One cell of the sweep."""

    selection: str  # label: name or name:param
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


def plan_conditions(
    treatment: ParsedSelection,
    controls: Sequence[ParsedSelection],
    method: Any,
    *,
    scales: Sequence[float] | None,
    bit: int | None,
    k_values: Sequence[int],
    seeds: Sequence[int],
) -> list[Condition]:
    """Every condition of the sweep, treatment first within each (k, scale)."""
    scale_list: list[float | None] = list(scales) if scales else [None]
    if method.takes_scale and not scales:
        scale_list = [method.default_scale]
    out: list[Condition] = []
    for k in k_values:
        for scale in scale_list:
            for parsed in [treatment, *controls]:
                if not parsed.spec.depends_on_k and k != k_values[0]:
                    continue  # e.g. all_k: the same weights whatever k is
                seeded = parsed.spec.stochastic or method.stochastic
                for seed in seeds if seeded else [None]:
                    out.append(Condition(parsed.label, method.name, scale, bit, k, seed))
    return out


@dataclass
class SweepInputs:
    """Everything a sweep needs besides the conditions and the evaluation."""

    model: Any
    arch: Any
    scope: list[Any]
    groups: dict[str, list[Any]]  # group label -> scope entries (see cwa.perturbation.groups)
    mode: str
    head_grouping: str
    key: str  # ranking key, "abs" or "value"
    ranking: Any  # polars frame (group_key, rank, parameter, flat_index), in scope, best first
    scores: Callable[[Sequence[Any]], Iterator[tuple[str, Any]]]
    selections: Mapping[str, ParsedSelection]  # label -> parsed selection
    method: Any  # PerturbationMethod
    store: Any = None
    rank_run: Any = None
    score_run: Any = None
    scope_record: dict[str, Any] = field(default_factory=dict)  # stored with every condition
    # Replay the hidden states below the scope's lowest layer (cwa.evaluation.layer_reuse).
    layer_reuse: bool = False
    layer_reuse_budget_gb: float = 4.0


@dataclass
class SweepResult:
    conditions: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # with condition_id
    groups: list[dict[str, Any]] = field(default_factory=list)  # condition_id, group_key, k
    layer_reuse: dict[str, Any] = field(default_factory=dict)  # what was reused, and why


_SHARED = (
    "scope",
    "groups",
    "ranking",
    "scores",
    "model",
    "arch",
    "store",
    "rank_run",
    "score_run",
)


def _request(inputs: SweepInputs, cond: Condition, treatment: Any, counts: Any) -> Any:
    parsed = inputs.selections[cond.selection]
    shared = {name: getattr(inputs, name) for name in _SHARED}
    return SelectionRequest(
        name=parsed.name,
        param=parsed.param,
        k=cond.k,
        seed=cond.seed,
        key=inputs.key,  # type: ignore[arg-type]
        counts=counts,
        treatment=treatment,
        **shared,
    )


def build_selection(
    inputs: SweepInputs, cond: Condition, treatments: dict[int, tuple[Any, dict[str, int]]]
) -> tuple[Any, dict[str, int]]:
    """The condition's selection and its per-group counts (treatments cached per k)."""
    from cwa.perturbation.groups import count_by_group

    parsed = inputs.selections[cond.selection]
    if parsed.spec.role == "treatment":
        if cond.k not in treatments:
            selection = parsed.spec.build(_request(inputs, cond, None, None))
            counts = count_by_group(selection, inputs.arch, inputs.mode, inputs.head_grouping)
            treatments[cond.k] = (selection, counts)
        return treatments[cond.k]
    treatment, wanted = treatments[cond.k]
    selection = parsed.spec.build(_request(inputs, cond, treatment, wanted))
    counts = count_by_group(selection, inputs.arch, inputs.mode, inputs.head_grouping)
    if parsed.spec.matched and counts != wanted:
        diff = sorted(set(counts.items()) ^ set(wanted.items()))[:2]
        raise InvalidInput(
            f"control {cond.selection!r} is not matched to the treatment per group (e.g. "
            f"{diff}); a matched control must draw each group's treatment count from it"
        )
    return selection, counts


def _role(spec: Any) -> str:
    if spec.role == "treatment":
        return "treatment"
    return "control" if spec.matched else "bound"


def run_sweep(
    inputs: SweepInputs,
    conditions: Sequence[Condition],
    evaluate: Callable[[], list[dict[str, Any]]],
    *,
    reporter: Reporter | None = None,
    reuse: Any = None,
) -> SweepResult:
    """Run every condition: build, perturb in place, evaluate, restore bit-exactly.

    ``reuse``: a :class:`~cwa.evaluation.layer_reuse.LayerReuse` session; by default one is
    made from ``inputs.layer_reuse`` and ``inputs.layer_reuse_budget_gb`` (off when False).
    """
    from cwa.evaluation.layer_reuse import sweep_reuse
    from cwa.perturbation.apply import perturbed
    from cwa.perturbation.checksum import named_checksums

    reporter = reporter or NULL_REPORTER
    params = dict(inputs.model.named_parameters())
    touched = [entry.name for entry in inputs.scope]
    baseline = named_checksums({n: params[n] for n in touched})
    scope_record = {
        **inputs.scope_record,
        "n_weights": int(sum(entry.count for entry in inputs.scope)),
    }
    result = SweepResult()
    if reuse is None:
        reuse = sweep_reuse(
            inputs.model,
            inputs.arch,
            touched,
            len(conditions),
            enabled=inputs.layer_reuse,
            budget_gb=inputs.layer_reuse_budget_gb,
            reporter=reporter,
        )
    treatments: dict[int, tuple[Any, dict[str, int]]] = {}
    task = reporter.task("perturbation conditions", len(conditions))
    try:
        for cond in conditions:
            selection, counts = build_selection(inputs, cond, treatments)
            extra = {n: baseline[n] for n in selection if n in baseline}
            with perturbed(
                inputs.model,
                selection,
                inputs.method,
                scale=cond.scale,
                bit=cond.bit,
                seed=cond.seed or 0,
                baseline_checksums=extra,
                reporter=reporter,
            ) as handle:
                with reuse.condition(list(selection)):
                    rows = evaluate()
            record = handle.record()
            result.conditions.append(
                {
                    "condition_id": cond.condition_id,
                    "selection": cond.selection,
                    "role": _role(inputs.selections[cond.selection].spec),
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
            result.groups += [
                {"condition_id": cond.condition_id, "group_key": label, "k": int(n)}
                for label, n in counts.items()
            ]
            result.evaluations += [
                {**r, "reused_from": None, "condition_id": cond.condition_id} for r in rows
            ]
            task.advance()
    finally:
        task.close()
        reuse.release()  # the captured states are the sweep's alone
    result.layer_reuse = reuse.record()
    if named_checksums({n: params[n] for n in touched}) != baseline:
        raise RestoreError("the model differs from its baseline after the sweep; discard it")
    return result


def summarize(
    rows: list[dict[str, Any]], conditions: list[dict[str, Any]]
) -> dict[tuple[str, str, str], dict[str, float]]:
    """Per (selection, task, metric): mean, std over seeds, min, max, baseline, mean ratio."""
    by_condition = {c["condition_id"]: c for c in conditions}
    baseline = {(r["task"], r["metric"]): r["value"] for r in rows if r["condition_id"] is None}
    k_per_selection: dict[str, set[int]] = {}
    for c in conditions:
        k_per_selection.setdefault(c["selection"], set()).add(c["k"])
    several_k = any(len(ks) > 1 for ks in k_per_selection.values())
    several_scales = len({c["scale"] for c in conditions}) > 1
    grouped: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        cond = by_condition.get(r["condition_id"])
        if cond is None:
            continue
        label = cond["selection"]
        if several_k and len(k_per_selection[cond["selection"]]) > 1:
            label += f".k{cond['k']}"
        if cond["scale"] is not None and several_scales:
            label += f".s{cond['scale']:g}"
        grouped.setdefault((label, r["task"], r["metric"]), []).append(float(r["value"]))
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


def conditions_frame(rows: list[dict[str, Any]]) -> Any:
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


def groups_frame(rows: list[dict[str, Any]]) -> Any:
    import polars as pl

    return pl.DataFrame(
        rows, schema={"condition_id": pl.String, "group_key": pl.String, "k": pl.Int64}
    )
