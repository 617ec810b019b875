"""``cwa perturb`` over a pruning-scale ranking (``cwa rank --topk N%``): the checks and the plan.

Such a ranking is stored compactly (:mod:`cwa.ranking_store`) and perturbed as stored: over its
own scope, with treatments that are prefixes of its order (:mod:`cwa.ranking_prefix`; per
tensor or per output row for ``--per tensor|row`` rankings), and controls matched in the groups
the ranking says (:attr:`~cwa.ranking_prefix.CompactRanking.control_mode`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput

if TYPE_CHECKING:
    from cwa.stages.perturb import PerturbConfig, PerturbPlan
    from cwa.store import Store
    from cwa.store.runs import RunRecord


def check_compact(rank_run: RunRecord, config: PerturbConfig, options: Any) -> None:
    """A pruning-scale ranking is perturbed as stored: its whole scope, prefixes of its order."""
    if config.layers or config.components or config.heads:
        raise InvalidInput(
            f"rank run {rank_run.run_id} is a pruning-scale ranking (--topk N%); perturb it "
            "over its own scope (drop --layers/--components/--heads, or rank that scope)"
        )
    if rank_run.config.get("bottom") and any(c.name == "bottom_k" for c in options.controls):
        raise InvalidInput(
            f"rank run {rank_run.run_id} ranks the bottom weights: its treatment already is "
            "the least important weights; drop bottom_k from --controls (use random_k)"
        )


def compact_plan(store: Store, config: PerturbConfig, base: PerturbPlan) -> PerturbPlan:
    """``base`` completed for a sweep over prefixes of a stored pruning-scale selection."""
    from cwa.perturbation.groups import group_scopes
    from cwa.ranking_prefix import CompactRanking, selection_artifact
    from cwa.stages.score import SCORE_FILE

    rank_run, score_run = base.rank_run, base.score_run
    info = rank_run.config["selection"]
    ranking = CompactRanking(
        selection_artifact(store, rank_run),
        store.artifacts_dir(score_run.run_id) / SCORE_FILE,
    )
    in_scope = {entry.name for entry in base.scope}
    outside = [name for name in ranking.names() if name not in in_scope]
    if outside:
        raise InvalidInput(
            f"rank run {rank_run.run_id} selected weights of {outside[0]!r}, outside the "
            "perturbation scope; perturb it over the rank run's own scope"
        )
    k_values = ranking.resolve_k_values(  # per-group (--per tensor|row) fractions included
        config.k_values, n_candidates=int(info["n_candidates"]), rank_id=rank_run.run_id
    )
    mode = ranking.control_mode or rank_run.config.get("mode", "global")
    head_grouping = rank_run.config.get("head_grouping", "kv")
    base.groups = group_scopes(base.loaded.arch, base.scope, mode, head_grouping)
    base.ranking, base.k_values = ranking, k_values
    base.mode, base.head_grouping = mode, head_grouping
    return base
