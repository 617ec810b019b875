"""``bottom_k``: the least sensitive weights of a scope, streamed tensor by tensor.

Per tensor, ``kthvalue`` finds the candidates; a running merge keeps the k smallest by
(key, scope position, flat index), so all scores are never concatenated. The key is the run's
ranking key: ``|score|`` (``key="abs"``, the default of signed metrics) or the raw score
(``key="value"``). Exact-zero scores are excluded by default (no evidence of insensitivity; see
:mod:`cwa.perturbation.selection`). :func:`bottom_k_by_group` is the matched control of a
per-group ranking: every group's count, from that group's elements, reading each tensor once;
:func:`bottom_k_by_row` that of a ``cwa rank --per row`` ranking (each output row's count).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from cwa.errors import InvalidInput, NonFiniteError
from cwa.perturbation.scope import ScopeEntry, check_scope, scope_size
from cwa.perturbation.selection import _FLAT_BITS, Selection, _group_by_entry, _union


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
    scores: Iterable[tuple[str, torch.Tensor]] | Callable[[Sequence[ScopeEntry]], Iterable[Any]],
    groups: Mapping[str, Sequence[ScopeEntry]],
    counts: Mapping[str, int],
    *,
    zeros: Literal["exclude", "include"] = "exclude",
    key: Literal["abs", "value"] = "abs",
) -> Selection:
    """For every group label in ``counts``, its ``counts[label]`` least sensitive weights drawn
    from ``groups[label]``; the union.

    ``scores`` yields (name, score tensor), read once: each tensor feeds every group holding
    part of it. Or it is a reader ``scores(entries) -> (name, scores)`` pairs: then the groups
    are worked through in buckets of groups over the same tensors (a layer's head groups), each
    bucket reading its tensors once, so only one bucket's masks are alive at a time.

    With ``zeros="exclude"`` a group with fewer non-zero scores than its count takes all of
    them and fills the rest with its zero-score weights in scope order (``info["zero_filled"]``
    says how many, per group): the count must match the treatment's, and a group whose scores
    are all zero has nothing else to offer.
    """
    key = _check_key(key, False)
    for label in counts:
        if label not in groups:
            raise InvalidInput(f"group {label!r} has no weights in scope to draw a control from")
    parts: list[Selection] = []
    zero_filled: dict[str, int] = {}
    if callable(scores):
        buckets: dict[tuple[str, ...], list[str]] = {}
        for label in counts:
            names_of = getattr(groups, "tensor_names", None)
            names = names_of(label) if names_of else tuple(e.name for e in groups[label])
            buckets.setdefault(tuple(names), []).append(label)
        for labels in buckets.values():
            entries = {label: check_scope(groups[label]) for label in labels}
            items = scores(entries[labels[0]])
            _bottom_of_groups(items, entries, counts, zeros, key, parts, zero_filled)
    else:
        entries = {label: check_scope(groups[label]) for label in counts}
        _bottom_of_groups(scores, entries, counts, zeros, key, parts, zero_filled)
    info = {"key": key, "zeros": zeros, "groups": dict(counts), "zero_filled": zero_filled}
    return _union(parts, "bottom_k", info)


def _bottom_of_groups(
    scores: Iterable[tuple[str, torch.Tensor]],
    entries: Mapping[str, list[ScopeEntry]],
    counts: Mapping[str, int],
    zeros: str,
    key: str,
    parts: list[Selection],
    zero_filled: dict[str, int],
) -> None:
    """bottom_k of the groups in ``entries`` from one pass over ``scores``, into ``parts``."""
    merges: dict[str, _BottomMerge] = {}
    fills: dict[str, _BottomMerge] = {}
    by_name: dict[str, list[_BottomMerge]] = {}
    for label, group_entries in entries.items():
        k = int(counts[label])
        merges[label] = _BottomMerge(group_entries, k, zeros, key)
        fills[label] = _BottomMerge(group_entries, k, "only", key)
        for entry in group_entries:
            by_name.setdefault(entry.name, []).extend([merges[label], fills[label]])
    for name, score in scores:
        for merge in by_name.get(name, ()):
            merge.offer(name, score)
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


def bottom_k_by_row(
    scores: Callable[[Sequence[ScopeEntry]], Iterable[tuple[str, torch.Tensor]]],
    treatment: Mapping[str, torch.Tensor],
    scope: Sequence[ScopeEntry],
    rows: Mapping[str, tuple[Sequence[int], int]],
    *,
    key: Literal["abs", "value"] = "abs",
) -> Selection:
    """The ``bottom_k`` control of a ``--per row`` ranking: in every output row, the treatment's
    count of that row's least sensitive in-scope weights by the ranking key.

    ``rows``: tensor name -> (shape, output axis), as for
    :func:`~cwa.perturbation.selection.random_k_by_row`. As in :func:`bottom_k`, exact-zero
    scores come last: a row with too few non-zero scores fills its count with zero-score weights
    in column order; ties go to the lower column; NaN (not scored) is never drawn.
    """
    import numpy as np

    from cwa import ranking_store
    from cwa.ranking_groups import group_ids, select_rows

    key = _check_key(key, False)
    entries = {e.name: e for e in check_scope(scope) if e.name in treatment}
    parts: dict[str, torch.Tensor] = {}
    n_zero_filled = 0
    for name, score in scores(list(entries.values())):
        if name not in entries:
            continue
        shape, axis = tuple(int(d) for d in rows[name][0]), int(rows[name][1])
        values = score.detach().float().cpu().numpy().reshape(shape)
        counts = np.bincount(group_ids(treatment[name].cpu().numpy(), shape, axis),
                             minlength=shape[axis])  # fmt: skip
        mask = entries[name].mask
        eligible = None if mask is None else mask.numpy().reshape(shape)
        view = values if axis == 0 else values.T
        eligible_view = None if eligible is None else (eligible if axis == 0 else eligible.T)
        chosen = np.zeros(shape, dtype=bool)
        chosen_view = chosen if axis == 0 else chosen.T
        step = max(1, ranking_store.SLICE // max(1, view.shape[1]))
        for start in range(0, view.shape[0], step):
            span = slice(start, start + step)
            piece = np.ascontiguousarray(view[span])
            codes = ranking_store._order_bits(piece, key, True).astype(np.int64)
            zero = piece == 0
            codes[zero] |= np.int64(1) << 32  # zero scores after every non-zero one
            not_candidate = np.isnan(piece)
            if eligible_view is not None:
                not_candidate |= ~eligible_view[span]
            codes[not_candidate] = np.int64(1) << 33
            if (counts[span] > (~not_candidate).sum(axis=1)).any():
                raise InvalidInput(f"a row of {name!r} has fewer scored weights than drawn")
            picked = select_rows(codes, counts[span])
            n_zero_filled += int((picked & zero).sum())
            chosen_view[span] = picked
        parts[name] = torch.from_numpy(np.flatnonzero(chosen.reshape(-1)))
    missing = [name for name in treatment if name not in parts]
    if missing:
        raise InvalidInput(f"no scores for {missing[0]!r}; score the tensors the ranking covers")
    info = {"key": key, "zeros": "exclude", "matched": "per output row",
            "zero_filled": n_zero_filled}  # fmt: skip
    return Selection(parts, kind="bottom_k", info=info)
