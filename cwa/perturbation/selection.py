"""Selections: which weights a perturbation touches, with exact counts.

A :class:`Selection` is a ``dict`` from parameter name to a sorted, duplicate-free int64 tensor
of flat (row-major) indices into that parameter, plus ``kind`` and ``info`` recording how it was
made (for the run's config). Builders:

``top_k``
    the first ``k`` rows of a ranking (parameter name, flat index) — the treatment.
``random_k``
    ``k`` weights uniformly without replacement from a scope, seeded. Done in the scope's global
    numbering (entries in order, in-scope elements in flat order) by drawing batches of uniform
    indices and discarding repeats, so it never builds a permutation of the scope: sampling from
    a 7B-weight scope costs O(k). When ``k`` exceeds half of the eligible weights a seeded
    permutation of the eligible positions is cheaper and is used instead. **Overlap with the
    treatment:** by default allowed (a uniform control is independent of the ranking, and at
    typical k the expected overlap ``k**2 / N`` is a handful of weights); pass ``exclude=`` the
    treatment to draw from the scope minus the treatment. ``info["overlap"]`` records the choice.
``bottom_k``
    the ``k`` in-scope weights with the smallest scores, streamed tensor by tensor (per-tensor
    ``kthvalue`` then a merge of at most ``2k`` candidates: never a concatenation of all scores).
    Ties are broken by scope order, then flat index, so the result is deterministic. **Exact-zero
    scores are excluded by default**: a zero score means the weight is zero or received no
    gradient from the calibration data (e.g. embedding rows of tokens that never occur), i.e. no
    evidence, not evidence of insensitivity; including them would make ``bottom_k`` the first k
    unexercised entries in scope order. ``zeros="include"`` ranks them as the least sensitive.
    The comparison key is the run's ranking key: ``key="abs"`` compares ``|score|`` (the default
    for signed metrics such as ``hutchinson_diag`` and ``obd``, whose large negative curvature is
    as much a sign of sensitivity as a large positive one), ``key="value"`` the raw score.
``random_k_by_group`` / ``bottom_k_by_group``
    the matched controls of a per-group ranking: for every group of the rank mode, exactly the
    treatment's count of that group, drawn from that group's elements (see
    :mod:`cwa.perturbation.groups`); the union of the groups' draws.
``random_k_by_row``
    the ``random_k`` control of a ``cwa rank --per row`` ranking: each output row's count.
``all_k``
    every weight in the scope: an upper bound on damage (memory: 8 bytes of index and one
    saved original per weight, so use it on targeted scopes, not on a whole 7B model).

Every builder except ``all_k`` returns exactly ``k`` weights, or raises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cwa.errors import InvalidInput
from cwa.perturbation.scope import ScopeEntry, check_scope, scope_size

# Largest batch of candidate indices drawn at once by random_k (bounds its temporaries).
_MAX_DRAW = 1 << 22
# Flat indices are packed with their scope position into one int64 sort key (entry << 40 | flat).
_FLAT_BITS = 40


class Selection(dict[str, torch.Tensor]):
    """Parameter name -> sorted unique int64 flat indices, with a record of how it was made."""

    def __init__(
        self,
        indices: Mapping[str, torch.Tensor] | None = None,
        *,
        kind: str = "custom",
        info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(indices or {})
        self.kind = kind
        self.info: dict[str, Any] = dict(info or {})

    @property
    def k(self) -> int:
        """Number of selected weights."""
        return sum(int(idx.numel()) for idx in self.values())

    def record(self) -> dict[str, Any]:
        """JSON-able description: kind, k, per-tensor counts and the builder's choices."""
        return {
            "selection": self.kind,
            "k": self.k,
            "per_tensor": {name: int(idx.numel()) for name, idx in self.items()},
            **self.info,
        }


def _group_by_entry(
    entries: Sequence[ScopeEntry], entry_ids: torch.Tensor, flats: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Split (entry id, flat index) pairs sorted by entry id into sorted per-name tensors."""
    result: dict[str, torch.Tensor] = {}
    if entry_ids.numel() == 0:
        return result
    ids, counts = torch.unique_consecutive(entry_ids, return_counts=True)
    for entry_id, part in zip(ids.tolist(), torch.split(flats, counts.tolist()), strict=True):
        result[entries[entry_id].name] = torch.sort(part).values
    return result


def _in_scope_exclusions(
    entries: Sequence[ScopeEntry], exclude: Mapping[str, torch.Tensor] | None
) -> dict[int, torch.Tensor]:
    """Entry id -> sorted unique in-scope flat indices that must not be drawn."""
    excluded: dict[int, torch.Tensor] = {}
    if not exclude:
        return excluded
    position = {entry.name: i for i, entry in enumerate(entries)}
    for name, idx in exclude.items():
        if name not in position or idx.numel() == 0:
            continue
        entry_id = position[name]
        idx = torch.unique(torch.as_tensor(idx, dtype=torch.int64).reshape(-1).cpu())
        idx = idx[entries[entry_id].contains(idx)]
        if idx.numel():
            excluded[entry_id] = idx
    return excluded


def _is_member(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    pos = torch.searchsorted(sorted_values, queries).clamp(max=sorted_values.numel() - 1)
    return sorted_values[pos] == queries


def _global_to_flat(
    entries: Sequence[ScopeEntry], ends: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map sorted global scope positions to (entry id, flat index) pairs (still sorted)."""
    entry_ids = torch.searchsorted(ends, positions, right=True)
    starts = ends - torch.tensor([e.count for e in entries], dtype=torch.int64)
    local = positions - starts[entry_ids]
    flats = local.clone()
    if positions.numel():
        ids, counts = torch.unique_consecutive(entry_ids, return_counts=True)
        offset = 0
        for entry_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
            entry = entries[entry_id]
            if entry.mask is not None:
                # Rank among the in-scope elements -> flat index (one tensor's mask at a time).
                span = slice(offset, offset + count)
                flats[span] = entry.flat_positions()[local[span]]
            offset += count
    return entry_ids, flats


def random_k(
    scope: Sequence[ScopeEntry],
    k: int,
    seed: int,
    *,
    exclude: Mapping[str, torch.Tensor] | None = None,
) -> Selection:
    """``k`` weights drawn uniformly without replacement from ``scope``, seeded by ``seed``.

    With ``exclude`` (e.g. the treatment selection) those weights are never drawn.
    """
    entries = check_scope(scope)
    k = int(k)
    n_total = scope_size(entries)
    excluded = _in_scope_exclusions(entries, exclude)
    n_excluded = sum(int(v.numel()) for v in excluded.values())
    n_eligible = n_total - n_excluded
    if not 0 <= k <= n_eligible:
        raise InvalidInput(
            f"random_k needs 0 <= k <= {n_eligible} eligible weights in scope "
            f"({n_total} in scope, {n_excluded} excluded), got k={k}; lower k or widen the scope"
        )
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    info: dict[str, Any] = {
        "seed": int(seed),
        "overlap": "excluded" if exclude is not None else "allowed",
        "n_excluded": n_excluded,
        "scope_size": n_total,
    }
    if k == 0:
        return Selection(kind="random_k", info={**info, "sampler": "none"})

    if 2 * k > n_eligible:
        # Dense case: a seeded permutation of the eligible positions (at most 2k of them).
        flat_parts, id_parts = [], []
        for entry_id, entry in enumerate(entries):
            flat = entry.flat_positions()
            if entry_id in excluded:
                flat = flat[~_is_member(excluded[entry_id], flat)]
            flat_parts.append(flat)
            id_parts.append(torch.full((flat.numel(),), entry_id, dtype=torch.int64))
        all_flats, all_ids = torch.cat(flat_parts), torch.cat(id_parts)
        chosen = torch.sort(torch.randperm(n_eligible, generator=generator)[:k]).values
        parts = _group_by_entry(entries, all_ids[chosen], all_flats[chosen])
        return Selection(parts, kind="random_k", info={**info, "sampler": "permutation"})

    # Sparse case: rejection sampling in the global numbering. The set of distinct values seen
    # is invariant under permutations of the eligible positions and the stopping rule depends
    # only on its size, so it is a uniform subset of its size; a uniform k-subset of it is then
    # a uniform k-subset of the eligible weights.
    ends = torch.cumsum(torch.tensor([e.count for e in entries], dtype=torch.int64), 0)
    found = torch.empty(0, dtype=torch.int64)
    while found.numel() < k:
        missing = k - found.numel()
        expected_draws = missing * n_total / max(n_eligible - found.numel(), 1)
        n_draw = min(int(expected_draws * 1.1) + 64, _MAX_DRAW)
        candidates = torch.unique(torch.randint(0, n_total, (n_draw,), generator=generator))
        if excluded:
            entry_ids, flats = _global_to_flat(entries, ends, candidates)
            keep = torch.ones_like(candidates, dtype=torch.bool)
            for entry_id, values in excluded.items():
                in_entry = entry_ids == entry_id
                keep[in_entry] = ~_is_member(values, flats[in_entry])
            candidates = candidates[keep]
        found = torch.unique(torch.cat([found, candidates]))
    if found.numel() > k:
        found = torch.sort(found[torch.randperm(found.numel(), generator=generator)[:k]]).values
    entry_ids, flats = _global_to_flat(entries, ends, found)
    parts = _group_by_entry(entries, entry_ids, flats)
    return Selection(parts, kind="random_k", info={**info, "sampler": "rejection"})


def all_k(scope: Sequence[ScopeEntry]) -> Selection:
    """Every weight in ``scope``."""
    entries = check_scope(scope)
    parts = {e.name: e.flat_positions() for e in entries if e.count}
    return Selection(parts, kind="all_k", info={"scope_size": scope_size(entries)})


def top_k(
    parameters: Sequence[str] | np.ndarray | Any,
    flat_indices: Sequence[int] | np.ndarray | torch.Tensor | Any,
    k: int | None = None,
    *,
    scope: Sequence[ScopeEntry] | None = None,
) -> Selection:
    """The first ``k`` rows (all rows if ``k`` is None) of a ranking given as two parallel
    columns, best first: parameter names and flat indices (e.g. ``df["parameter"]``,
    ``df["flat_index"]`` of a polars frame). With ``scope``, every row must lie in it.
    """
    names = np.asarray(parameters).astype(str).reshape(-1)
    if isinstance(flat_indices, torch.Tensor):
        flat_indices = flat_indices.cpu().numpy()
    indices = np.asarray(flat_indices).reshape(-1)
    if names.shape != indices.shape:
        raise InvalidInput(
            f"ranking has {names.size} parameter names but {indices.size} flat indices; "
            "pass two columns of the same ranking"
        )
    n_rows = names.size
    k = n_rows if k is None else int(k)
    if not 0 <= k <= n_rows:
        raise InvalidInput(f"top_k needs 0 <= k <= {n_rows} ranked rows, got k={k}; lower k")
    if k and not np.issubdtype(indices.dtype, np.integer):
        raise InvalidInput(f"flat indices must be integers, got dtype {indices.dtype}")
    if k == 0:
        return Selection(kind="top_k", info={"n_ranked_rows": n_rows})
    names, indices = names[:k], indices[:k].astype(np.int64)
    unique_names, codes = np.unique(names, return_inverse=True)
    order = np.lexsort((indices, codes))  # by name code, then flat index
    codes, indices = codes[order], indices[order]
    duplicate = (codes[1:] == codes[:-1]) & (indices[1:] == indices[:-1])
    if duplicate.any():
        at = int(np.argmax(duplicate))
        raise InvalidInput(
            f"ranking lists weight ({unique_names[codes[at]]}, {indices[at]}) twice; "
            "a ranking must name each weight once"
        )
    counts = np.bincount(codes, minlength=unique_names.size)
    parts: dict[str, torch.Tensor] = {}
    splits = np.split(indices, np.cumsum(counts)[:-1])
    for name, part in zip(unique_names.tolist(), splits, strict=True):
        parts[name] = torch.from_numpy(np.ascontiguousarray(part))
    if scope is not None:
        entries = {e.name: e for e in check_scope(scope)}
        for name, idx in parts.items():
            entry = entries.get(name)
            outside = idx if entry is None else idx[~entry.contains(idx)]
            if outside.numel():
                raise InvalidInput(
                    f"ranked weight ({name}, {int(outside[0])}) is outside the perturbation scope; "
                    "use the scope the ranking was made in"
                )
        order_in_scope = {name: i for i, name in enumerate(entries)}
        parts = dict(sorted(parts.items(), key=lambda item: order_in_scope[item[0]]))
    return Selection(parts, kind="top_k", info={"n_ranked_rows": n_rows})


def random_k_by_group(
    groups: Mapping[str, Sequence[ScopeEntry]], counts: Mapping[str, int], seed: int
) -> Selection:
    """For every group label in ``counts``, ``counts[label]`` weights drawn uniformly from
    ``groups[label]``; the union. Each group's generator is seeded from (seed, group label)."""
    parts = []
    for label, k in counts.items():
        if label not in groups:
            raise InvalidInput(f"group {label!r} has no weights in scope to draw a control from")
        parts.append(random_k(groups[label], int(k), group_seed(int(seed), label)))
    return _union(parts, "random_k", {"seed": int(seed), "groups": dict(counts)})


def random_k_by_row(
    treatment: Mapping[str, torch.Tensor],
    scope: Sequence[ScopeEntry],
    rows: Mapping[str, tuple[Sequence[int], int]],
    seed: int,
) -> Selection:
    """The matched control of a ``--per row`` ranking: in every output row, the treatment's
    count of that row drawn uniformly from the row's in-scope elements.

    ``rows``: tensor name -> (shape, output axis: 0 for Linear ``[out, in]``, 1 for Conv1D
    ``[in, out]``). Per tensor (generator seeded from (seed, name)), chunks of rows get uniform
    float32 keys and each row keeps its count of smallest keys (a uniform subset; exact float
    ties, about 2^-24 apart, go to the lower column). No loop over weights or rows.
    """
    from cwa import ranking_store
    from cwa.ranking_groups import group_ids, select_rows

    entries = {entry.name: entry for entry in check_scope(scope)}
    parts: dict[str, torch.Tensor] = {}
    for name, idx in treatment.items():
        if name not in entries or name not in rows:
            raise InvalidInput(f"{name!r} has no output rows in scope to draw a control from")
        shape, axis = tuple(int(d) for d in rows[name][0]), int(rows[name][1])
        n_rows, n_cols = shape[axis], entries[name].numel // shape[axis]
        flat = idx.cpu().numpy()
        counts = np.bincount(group_ids(flat, shape, axis), minlength=n_rows)
        mask = entries[name].mask
        eligible = None if mask is None else mask.numpy().reshape(shape)
        if eligible is not None:
            eligible = eligible if axis == 0 else eligible.T
        generator = torch.Generator(device="cpu").manual_seed(group_seed(int(seed), name))
        chosen = np.zeros(shape, dtype=bool)
        chosen_view = chosen if axis == 0 else chosen.T
        step = max(1, ranking_store.SLICE // max(1, n_cols))
        for start in range(0, n_rows, step):
            span = slice(start, min(n_rows, start + step))
            keys = torch.rand((span.stop - start, n_cols), generator=generator).numpy()
            if eligible is not None:
                keys[~eligible[span]] = 2.0  # above every uniform key: never drawn
                short = counts[span] > eligible[span].sum(axis=1)
                if short.any():
                    raise InvalidInput(f"a row of {name!r} has fewer weights in scope than drawn")
            chosen_view[span] = select_rows(keys, counts[span])
        parts[name] = torch.from_numpy(np.flatnonzero(chosen.reshape(-1)))
    info = {"seed": int(seed), "matched": "per output row", "overlap": "allowed"}
    return Selection(parts, kind="random_k", info=info)


def group_seed(seed: int, label: str) -> int:
    """Seed of one group's draw: SHA-256 of (seed, group label), 63 bits; groups are independent
    and a group's draw does not depend on which other groups exist."""
    digest = hashlib.sha256(f"{int(seed)}\x00group\x00{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _union(parts: Sequence[Selection], kind: str, info: dict[str, Any]) -> Selection:
    pieces: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        for name, idx in part.items():
            pieces.setdefault(name, []).append(idx)
    merged = {name: torch.unique(torch.cat(chunks)) for name, chunks in pieces.items()}
    total = sum(int(v.numel()) for v in merged.values())
    expected = sum(part.k for part in parts)
    if total != expected:  # groups partition the weights; an overlap is a bug, not a draw
        raise InvalidInput(f"{kind} groups overlap: {expected} drawn, {total} distinct")
    return Selection(merged, kind=kind, info=info)


# bottom_k and its per-group form live in their own module (they import this one).
from cwa.perturbation.bottom import bottom_k, bottom_k_by_group  # noqa: E402,F401
