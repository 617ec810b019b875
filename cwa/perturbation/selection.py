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
``all_k``
    every weight in the scope: an upper bound on damage (memory: 8 bytes of index and one
    saved original per weight, so use it on targeted scopes, not on a whole 7B model).

Every builder except ``all_k`` returns exactly ``k`` weights, or raises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from cwa.errors import InvalidInput, NonFiniteError
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


def _smallest_flat(scores: torch.Tensor, valid: torch.Tensor | None, k: int) -> torch.Tensor:
    """Sorted flat indices of the k smallest valid scores, ties to the lower flat index."""
    n_valid = scores.numel() if valid is None else int(valid.sum())
    if n_valid <= k:
        if valid is None:
            return torch.arange(scores.numel(), dtype=torch.int64, device=scores.device)
        return valid.nonzero().view(-1)
    values = scores if valid is None else scores[valid]
    threshold = torch.kthvalue(values, k).values
    below = scores < threshold
    equal = scores == threshold
    if valid is not None:
        below &= valid
        equal &= valid
    below_flat = below.nonzero().view(-1)
    equal_flat = equal.nonzero().view(-1)[: k - below_flat.numel()]
    return torch.sort(torch.cat([below_flat, equal_flat])).values


class _BottomMerge:
    """Running k smallest keys of one scope, fed one tensor at a time (see :func:`bottom_k`)."""

    def __init__(self, entries: Sequence[ScopeEntry], k: int, zeros: str, key: str) -> None:
        self.entries = entries
        self.k = k
        self.zeros = zeros
        self.key = key
        self.position = {e.name: i for i, e in enumerate(entries)}
        self.seen: set[str] = set()
        self.n_zero = 0
        self.n_candidates = 0
        self.best_scores = torch.empty(0, dtype=torch.float64)
        self.best_keys = torch.empty(0, dtype=torch.int64)  # entry << _FLAT_BITS | flat

    def offer(self, name: str, score: torch.Tensor) -> None:
        if name not in self.position:
            return
        if name in self.seen:
            raise InvalidInput(f"scores for {name!r} were given twice; pass each tensor once")
        self.seen.add(name)
        entry_id = self.position[name]
        entry = self.entries[entry_id]
        flat_scores = score.detach().reshape(-1)
        if flat_scores.numel() != entry.numel:
            raise InvalidInput(
                f"scores of {name!r} have {flat_scores.numel()} elements, the parameter "
                f"{entry.numel}; use the score file of this model"
            )
        if not flat_scores.is_floating_point() or flat_scores.element_size() < 4:
            flat_scores = flat_scores.float()  # kthvalue and comparisons in at least float32
        if self.key == "abs":
            flat_scores = flat_scores.abs()
        valid = None if entry.mask is None else entry.mask.to(flat_scores.device)
        in_scope = flat_scores if valid is None else flat_scores[valid]
        if torch.isnan(in_scope).any():
            raise NonFiniteError(f"scores of {name!r} contain NaN; recompute the scores")
        is_zero = flat_scores == 0
        zero_in_scope = is_zero if valid is None else is_zero & valid
        n_zero = int(zero_in_scope.sum())
        self.n_zero += n_zero
        if self.zeros == "exclude":
            valid = ~is_zero if valid is None else valid & ~is_zero
            self.n_candidates += entry.count - n_zero
        elif self.zeros == "only":  # the zero-score fill of bottom_k_by_group
            valid = is_zero if valid is None else valid & is_zero
            self.n_candidates += n_zero
        else:
            self.n_candidates += entry.count
        flat = _smallest_flat(flat_scores, valid, self.k)
        cand_scores = flat_scores[flat].to(device="cpu", dtype=torch.float64)
        cand_keys = (entry_id << _FLAT_BITS) | flat.cpu()
        # Merge: order by (score, scope position, flat index) with two stable sorts, keep k.
        merged_scores = torch.cat([self.best_scores, cand_scores])
        merged_keys = torch.cat([self.best_keys, cand_keys])
        by_key = torch.sort(merged_keys, stable=True).indices
        by_score = torch.sort(merged_scores[by_key], stable=True).indices
        keep = by_key[by_score[: self.k]]
        self.best_scores, self.best_keys = merged_scores[keep], merged_keys[keep]

    def result(self, group: str | None = None) -> Selection:
        where = "" if group is None else f" of group {group}"
        missing = [e.name for e in self.entries if e.name not in self.seen]
        if missing:
            raise InvalidInput(
                f"no scores for {len(missing)} tensor(s) in scope{where}, e.g. {missing[0]!r}; "
                "score the same tensors the scope covers"
            )
        if self.k > self.n_candidates:
            hint = " or pass zeros='include'" if self.zeros == "exclude" and self.n_zero else ""
            raise InvalidInput(
                f"bottom_k needs k <= {self.n_candidates} candidate weights in scope{where} "
                f"({self.n_zero} zero scores, zeros={self.zeros!r}), got k={self.k}; lower k{hint}"
            )
        return self.held()

    def held(self, n: int | None = None) -> Selection:
        """The (first ``n`` of the) entries held, without checking that there are k."""
        keys = self.best_keys if n is None else self.best_keys[:n]
        scores = self.best_scores if n is None else self.best_scores[:n]
        order = torch.sort(keys).indices
        best_keys = keys[order]
        entry_ids = best_keys >> _FLAT_BITS
        flats = best_keys & ((1 << _FLAT_BITS) - 1)
        info = {
            "zeros": self.zeros,
            "key": self.key,
            "n_zero_scores_in_scope": self.n_zero,
            "max_selected_key": float(scores.max()) if scores.numel() else None,
            "ties": "scope order, then flat index",
            "scope_size": scope_size(self.entries),
        }
        parts = _group_by_entry(self.entries, entry_ids, flats)
        return Selection(parts, kind="bottom_k", info=info)


def _check_key(key: str | None, absolute: bool) -> str:
    if key is None:
        return "abs" if absolute else "value"
    if key not in ("abs", "value"):
        raise InvalidInput(f"ranking key must be 'abs' or 'value', got {key!r}")
    return key


def bottom_k(
    scores: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    scope: Sequence[ScopeEntry],
    k: int,
    *,
    zeros: Literal["exclude", "include"] = "exclude",
    absolute: bool = False,
    key: Literal["abs", "value"] | None = None,
) -> Selection:
    """The ``k`` in-scope weights with the smallest key (see the module docstring).

    ``key="abs"`` compares ``|score|`` (the default key of signed metrics), ``key="value"`` the
    raw score (negative scores then count as the least sensitive); ``absolute=True`` is the
    older spelling of ``key="abs"``. ``scores`` yields (parameter name, score tensor of the
    parameter's shape), e.g. lazily from a safetensors score file; names outside the scope are
    skipped, and every scope entry must get its scores.
    """
    if zeros not in ("exclude", "include"):
        raise InvalidInput(f"zeros must be 'exclude' or 'include', got {zeros!r}")
    entries = check_scope(scope)
    k = int(k)
    if k < 0:
        raise InvalidInput(f"bottom_k needs k >= 0, got {k}")
    merge = _BottomMerge(entries, k, zeros, _check_key(key, absolute))
    items = scores.items() if isinstance(scores, Mapping) else scores
    for name, score in items:
        merge.offer(name, score)
    return merge.result()


def bottom_k_by_group(
    scores: Iterable[tuple[str, torch.Tensor]],
    groups: Mapping[str, Sequence[ScopeEntry]],
    counts: Mapping[str, int],
    *,
    zeros: Literal["exclude", "include"] = "exclude",
    key: Literal["abs", "value"] = "abs",
) -> Selection:
    """For every group label in ``counts``, its ``counts[label]`` least sensitive weights drawn
    from ``groups[label]``; the union. ``scores`` is read once (each tensor feeds every group
    holding part of it), so a head ranking does not re-read a layer's tensors per head.

    With ``zeros="exclude"`` a group with fewer non-zero scores than its count takes all of
    them and fills the rest with its zero-score weights in scope order (``info["zero_filled"]``
    says how many, per group): the count must match the treatment's, and a group whose scores
    are all zero has nothing else to offer.
    """
    key = _check_key(key, False)
    merges: dict[str, _BottomMerge] = {}
    fills: dict[str, _BottomMerge] = {}
    by_name: dict[str, list[_BottomMerge]] = {}
    for label, k in counts.items():
        if label not in groups:
            raise InvalidInput(f"group {label!r} has no weights in scope to draw a control from")
        entries = check_scope(groups[label])
        merges[label] = _BottomMerge(entries, int(k), zeros, key)
        fills[label] = _BottomMerge(entries, int(k), "only", key)
        for entry in groups[label]:
            by_name.setdefault(entry.name, []).extend([merges[label], fills[label]])
    for name, score in scores:
        for merge in by_name.get(name, ()):
            merge.offer(name, score)
    parts = []
    zero_filled: dict[str, int] = {}
    for label, merge in merges.items():
        if zeros == "include" or merge.n_candidates >= merge.k:
            parts.append(merge.result(label))
            continue
        # Too few non-zero scores in this group (e.g. a bias whose scores are all zero, of
        # which the treatment ranked some): take them all, then fill with zero-score weights
        # in scope order so that the group still gets the treatment's count.
        fill = fills[label]
        need = merge.k - merge.n_candidates
        if fill.n_candidates < need:
            merge.result(label)  # raises: not enough weights at all
        parts.append(merge.held())
        parts.append(fill.held(need))
        zero_filled[label] = need
    info = {"key": key, "zeros": zeros, "groups": dict(counts), "zero_filled": zero_filled}
    return _union(parts, "bottom_k", info)


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
