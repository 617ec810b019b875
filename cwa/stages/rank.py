"""The ``rank`` stage: the top-k (or bottom-k) weights of a score run, per ranking mode.

Rows go to ``ranked_weights`` (one group ``all`` for global mode, one group per layer, tensor,
head or component otherwise; see :mod:`cwa.perturbation.groups`). The ranking key is recorded on
the run (``config.by``): ``abs`` ranks by ``|score|`` and is the default for metrics whose
scores can be negative (``hutchinson_diag``, ``obd``), ``value`` the raw score (the default
otherwise). The model the scores were computed on is loaded **before** the run is registered
(to check the options against its architecture) and its fingerprint must match the score run's.
A ``--topk`` beyond the largest group in scope is refused; ``--topk all`` ranks every weight
in scope and warns how many rows that writes.

``--topk N%`` stores the exact selection compactly (:mod:`cwa.ranking_store`); ``--per
tensor|row`` compares within each tensor or each output row (:mod:`cwa.ranking_groups`; output
axes and bad combinations are checked against the loaded model before the run is registered),
and ``ranked_weights`` then holds the best selected weights of each tensor (group = tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwa.errors import InvalidInput
from cwa.lifecycle import RunContext, RunOutcome, StageOutput
from cwa.progress import NULL_REPORTER, Reporter
from cwa.stages.common import check_positive
from cwa.stages.score import SCORE_FILE
from cwa.stages.setup import load_source_model, stage_request
from cwa.store import Store

__all__ = ["RankConfig", "export_rows", "load_source_model", "run_rank"]


@dataclass
class RankConfig:
    score_run: str = "latest:score"
    topk: int | str = 100  # an integer, or "all" (every weight in scope, with a warning)
    mode: str = "global"
    bottom: bool = False
    layers: list[int] | None = None
    components: list[str] | None = None
    export: str | None = None  # .csv or .parquet path for the ranked rows
    device: str = "cpu"
    device_map: str | None = None  # auto|balanced|FILE.json
    experiment: str | None = None  # default: the score run's experiment
    command: str | None = None
    by: str | None = None  # "abs" | "value"; None: abs for signed metrics, value otherwise
    head_grouping: str = "kv"  # head mode: "kv" (key-value groups) or "component"
    # Comparison group of --topk N%: global, tensor or row (each output row; cwa.ranking_groups)
    per: str = "global"


def export_rows(frame: Any, path: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        frame.write_csv(path)
    elif suffix == ".parquet":
        frame.write_parquet(path)
    else:
        raise InvalidInput(f"--export {path!r}: use a .csv or .parquet file name")


def _check_options(config: RankConfig) -> None:
    from cwa.perturbation.groups import check_head_grouping
    from cwa.ranking import RANK_KEYS, RANK_MODES
    from cwa.ranking_groups import check_per

    check_per(config.per, config.topk)
    if isinstance(config.topk, str) and config.topk.strip().endswith("%"):
        from cwa.ranking_store import check_fraction_rank

        check_fraction_rank(config)  # pruning-scale k: validated before anything is loaded
    elif config.topk != "all":
        if isinstance(config.topk, str) and config.topk.strip().isdigit():
            config.topk = int(config.topk)
        if not isinstance(config.topk, int):
            raise InvalidInput(f"--topk {config.topk!r}: give a whole number or 'all'")
        check_positive("topk", config.topk)
    if config.mode not in RANK_MODES:
        raise InvalidInput(
            f"unknown ranking mode {config.mode!r}; use one of {', '.join(RANK_MODES)}"
        )
    if config.by is not None and config.by not in RANK_KEYS:
        raise InvalidInput(f"--by {config.by!r}: use one of {', '.join(RANK_KEYS)}")
    check_head_grouping(config.head_grouping)
    if config.export:
        suffix = Path(config.export).suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise InvalidInput(f"--export {config.export!r}: use a .csv or .parquet file name")
        if not Path(config.export).resolve().parent.is_dir():
            raise InvalidInput(
                f"--export {config.export}: folder {Path(config.export).parent} does not exist"
            )
    if config.components:
        from cwa.models.architecture import resolve_components

        resolve_components(config.components)  # unknown names fail before a run is registered


def _largest_group(arch: Any, header: dict[str, Any], config: RankConfig) -> int:
    """Weights in the largest group of the mode, within the scored tensors and the scope."""
    from cwa.models.architecture import resolve_components
    from cwa.perturbation.groups import group_scopes
    from cwa.perturbation.scope import ScopeEntry

    layers = config.layers
    comps = resolve_components(config.components)
    scope = []
    for name in arch.select(layers=layers, components=comps):
        if name in header:
            mask = arch.scope_mask(name, layers=layers, components=comps)
            numel = arch.params[name].numel
            entry = ScopeEntry(name, numel, None if mask is None else mask.reshape(-1))
            if entry.count:
                scope.append(entry)
    groups = group_scopes(arch, scope, config.mode, config.head_grouping)
    return max((sum(e.count for e in entries) for entries in groups.values()), default=0)


def _check_grouped(
    loaded: Any, header: dict[str, Any], names: list[str] | None, config: RankConfig
) -> tuple[int, dict[str, int] | None]:
    """``--per tensor|row`` checked against the model before the run is registered.

    Returns the rows per tensor kept in ranked_weights and the output axes (row mode).
    """
    from cwa.ranking_groups import group_k, percent_of, row_axes
    from cwa.ranking_store import ROWS_IN_TABLE

    scope = names if names is not None else list(header)
    percent = percent_of(config.topk)
    axes = row_axes(loaded.model, scope, loaded.arch.tied) if config.per == "row" else None
    sizes = [
        int(header[n]["shape"][axes[n]]) if axes else 1 for n in scope
    ]  # groups per tensor; members = numel / groups
    members = [max(1, _numel(header[n]["shape"]) // g) for n, g in zip(scope, sizes, strict=True)]
    if not any(int(group_k(m, percent)) for m in members):
        raise InvalidInput(
            f"--topk {config.topk} --per {config.per} selects no weight: every {config.per} "
            f"holds at most {max(members)} weights; raise the fraction"
        )
    return max(1, ROWS_IN_TABLE // max(1, len(scope))), axes


def _numel(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _compute_grouped(
    ctx: RunContext,
    score_path: Path,
    loaded: Any,
    config: RankConfig,
    by: str,
    names: list[str] | None,
    axes: dict[str, int] | None,
    rows_per_tensor: int,
) -> StageOutput:
    """Selection artifact of a ``--per tensor|row`` ranking; ranked_weights gets the best
    ``rows_per_tensor`` selected weights of each tensor (group_key = the tensor)."""
    from cwa.ranking import rank_tensors, ranking_frame
    from cwa.ranking_store import SELECTION_FILE, iter_selection, store_selection

    metrics = store_selection(
        ctx, score_path, config.topk, by=by, bottom=config.bottom, names=names,
        per=config.per, axes=axes,
    )  # fmt: skip
    artifact = ctx.artifact_path(SELECTION_FILE, kind="selection")
    rows = rank_tensors(
        _selected_scores(score_path, artifact, iter_selection),
        loaded.arch,
        k=rows_per_tensor,
        mode="tensor",
        bottom=config.bottom,
        weights=dict(loaded.model.named_parameters()),
        by=by,
    )
    frame = ranking_frame(rows).rename(
        {"row": "row_index", "column": "column_index", "group": "group_key"}
    )
    if config.export:
        export_rows(frame, config.export)
    metrics.update(
        {"n_ranked": float(frame.height), "n_groups": float(frame["group_key"].n_unique())}
    )
    return StageOutput(tables={"ranked_weights": frame}, metrics=metrics, value=frame)


def _selected_scores(score_path: Path, artifact: Path, iter_selection: Any) -> Any:
    """(name, scores) with every weight outside the selection set to NaN (not ranked)."""
    import torch

    from cwa.scorefile import open_scores

    with open_scores(score_path) as reader:
        for name, indices in iter_selection(artifact):
            if indices.size == 0:
                continue
            scores = reader.get(name).float()
            masked = torch.full_like(scores, float("nan")).reshape(-1)
            index = torch.from_numpy(indices)
            masked[index] = scores.reshape(-1)[index]
            yield name, masked.reshape(scores.shape)


def run_rank(
    store: Store,
    config: RankConfig,
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
    loaded: Any = None,
) -> RunOutcome:
    from cwa.scorefile import read_score_header
    from cwa.store.results import succeeded_run

    reporter = reporter or NULL_REPORTER
    _check_options(config)
    score_run = succeeded_run(store, config.score_run, "score")
    score_id = score_run.run_id
    score_path = store.artifacts_dir(score_id) / SCORE_FILE
    if not score_path.is_file():
        raise InvalidInput(
            f"score run {score_id} has no {SCORE_FILE} in {score_path.parent}; "
            "its artifacts were removed: re-run the score stage"
        )
    by = config.by or ("abs" if score_run.config.get("signed") else "value")
    loaded_model = load_source_model(
        store,
        score_run,
        device=config.device,
        reporter=reporter,
        loaded=loaded,
        device_map=config.device_map,
        stage="rank",
    )
    if config.layers:
        for layer in config.layers:
            loaded_model.arch._check_layer(layer)
    header, _ = read_score_header(score_path)
    largest = _largest_group(loaded_model.arch, header, config)
    if largest == 0:
        raise InvalidInput(
            "no scored weight lies in the requested layers/components; widen them or score them"
        )
    topk = config.topk
    fraction = isinstance(topk, str) and topk.endswith("%")
    axes: dict[str, int] | None = None
    names: list[str] | None = None
    if fraction:
        from cwa.models.architecture import resolve_components
        from cwa.ranking_store import ROWS_IN_TABLE, fraction_scope, parse_k

        comps = resolve_components(config.components)
        names = fraction_scope(loaded_model.arch, header, config.layers, comps)
        if config.per == "global":
            selected_k = parse_k(topk, largest)
            topk = min(selected_k, ROWS_IN_TABLE)  # the first rows go to ranked_weights
        else:
            topk, axes = _check_grouped(loaded_model, header, names, config)
    elif topk == "all":
        topk = largest
        reporter.warn(
            f"--topk all ranks every weight in scope: up to {largest} per group, "
            "all of them written to ranked_weights"
        )
    elif topk > largest:
        raise InvalidInput(
            f"--topk {topk} is more than the {largest} weights of the largest {config.mode} group "
            "in scope; lower it, or pass --topk all to rank every weight (large tables)"
        )
    request = stage_request(
        "rank",
        config,
        parents=[(score_id, "scores")],
        experiment=config.experiment,
        source=score_run,
        score_run=score_id,
        topk=topk,
        topk_requested=config.topk,
        by=by,
    )

    def compute(ctx: RunContext) -> StageOutput:
        from cwa.ranking import rank_scores, ranking_frame

        ctx.set_model(score_run.model_ref, loaded_model.fingerprint, loaded_model.device)
        if fraction and config.per != "global":
            return _compute_grouped(ctx, score_path, loaded_model, config, by, names, axes, topk)
        rows = rank_scores(
            score_path,
            loaded_model.arch,
            k=int(topk),
            mode=config.mode,
            bottom=config.bottom,
            layers=config.layers,
            components=config.components,
            weights=dict(loaded_model.model.named_parameters()),
            by=by,
            head_grouping=config.head_grouping,
        )
        frame = ranking_frame(rows).rename(
            {"row": "row_index", "column": "column_index", "group": "group_key"}
        )
        if config.export:
            export_rows(frame, config.export)
        scores = frame["score"]
        metrics = {
            "n_ranked": float(frame.height),
            "n_groups": float(frame["group_key"].n_unique()),
        }
        if frame.height:
            metrics.update({"score_max": float(scores.max()), "score_min": float(scores.min())})
        if fraction:
            from cwa.ranking_store import store_selection

            metrics.update(
                store_selection(
                    ctx, score_path, selected_k, by=by, bottom=config.bottom, names=names
                )
            )
        return StageOutput(tables={"ranked_weights": frame}, metrics=metrics, value=frame)

    from cwa.distributed import run_stage  # execute_stage on every rank of a torchrun world

    return run_stage(store, request, compute, reporter=reporter, mlflow=mlflow)
