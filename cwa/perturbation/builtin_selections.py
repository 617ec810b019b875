"""The built-in selections as :class:`~cwa.perturbation.contract.SelectionSpec` entries.

``top_k`` is the treatment (the best-ranked weights in scope); ``random_k`` and ``bottom_k`` are
matched controls drawn group by group with the treatment's per-group counts; ``all_k`` is the
whole scope, an upper bound on damage rather than a matched control.
"""

from __future__ import annotations

from typing import Any

from cwa.errors import InvalidInput
from cwa.perturbation.contract import SelectionRequest, SelectionSpec
from cwa.perturbation.selection import (
    Selection,
    all_k,
    bottom_k_by_group,
    random_k_by_group,
    top_k,
)


def _top_k(request: SelectionRequest) -> Selection:
    ranking = request.ranking
    if hasattr(ranking, "prefix"):  # a pruning-scale ranking streamed from its artifact
        import torch

        if not 1 <= request.k <= ranking.height:
            raise InvalidInput(
                f"k={request.k} is outside the stored ranking's 1..{ranking.height}; lower k"
            )
        parts = {name: torch.from_numpy(idx) for name, idx in ranking.prefix(request.k).items()}
        return Selection(parts, kind="top_k", info={"n_ranked_rows": ranking.height})
    if ranking.height < request.k:
        raise InvalidInput(
            f"only {ranking.height} ranked weights lie in scope, fewer than k={request.k}; "
            "lower k or widen the scope"
        )
    head: Any = ranking.head(request.k)
    return top_k(head["parameter"].to_list(), head["flat_index"].to_list())


def _random_k(request: SelectionRequest) -> Selection:
    assert request.counts is not None  # controls always get the treatment's counts
    rows = getattr(request.ranking, "row_layout", None)
    if rows:  # a --per row ranking: matched row by row (per tensor too, as the sweep checks)
        from cwa.perturbation.selection import random_k_by_row

        return random_k_by_row(request.treatment, request.scope, rows, request.seed or 0)
    return random_k_by_group(request.groups, request.counts, request.seed or 0)


def _bottom_k(request: SelectionRequest) -> Selection:
    assert request.counts is not None
    rows = getattr(request.ranking, "row_layout", None)
    if rows:  # a --per row ranking: each output row's count of its least sensitive weights
        from cwa.perturbation.bottom import bottom_k_by_row

        return bottom_k_by_row(
            request.scores, request.treatment, request.scope, rows, key=request.key
        )
    # The reader form: groups are worked through a few tensors at a time (bounded memory).
    return bottom_k_by_group(request.scores, request.groups, request.counts, key=request.key)


def _all_k(request: SelectionRequest) -> Selection:
    return all_k(request.scope)


TOP_K = SelectionSpec(
    "top_k",
    "the k highest-ranked weights of a rank run (the treatment)",
    _top_k,
    role="treatment",
    matched=False,
)
RANDOM_K = SelectionSpec(
    "random_k",
    "per group of the rank mode (per output row for a --per row ranking), the treatment's "
    "count drawn uniformly from the group, seeded",
    _random_k,
    stochastic=True,
)
BOTTOM_K = SelectionSpec(
    "bottom_k",
    "per group (per output row for a --per row ranking), the treatment's count of least "
    "sensitive weights by the ranking key (no zeros)",
    _bottom_k,
)
ALL_K = SelectionSpec(
    "all_k",
    "every weight in the scope (upper bound on damage; not matched)",
    _all_k,
    matched=False,
    depends_on_k=False,
)
