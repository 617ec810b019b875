"""Exact top-k / bottom-k rankings of per-weight scores, streamed tensor by tensor.

:func:`rank_scores` reads a score file one tensor at a time and keeps, per group, only a running
set of at most k candidates; all scores are never concatenated (DESIGN.md "Performance rules").
Extra memory is O(k * groups) for the running sets plus a few temporaries of the size of the
tensor being read.

Key and order (exact, including ties): the key is the score (``by="value"``) or its absolute
value (``by="abs"``, the default of the rank stage for signed metrics such as ``hutchinson_diag``
and ``obd``); higher key first; among equal keys the parameter that comes first in the
architecture map (``named_parameters()`` order) wins, then the lower flat index. ``bottom=True``
ranks lowest keys first with the same tie rule. Rows always carry the raw score. NaN scores mean
"not scored" (out-of-scope elements of a partly selected tensor) and are never ranked;
``layers`` / ``components`` narrow the ranking further through the architecture map.

Modes and their groups (``rank`` counts from 1 inside each group; ``group`` names it) are
defined once, in :mod:`cwa.perturbation.groups`, which the matched controls use too: ``global``
(``"all"``), ``tensor`` (the parameter), ``layer`` (``"layer=3"``, ``"layer=none"``),
``component`` (``"attn_q"``; fused tensors split per element) and ``head``: by default one group
per key-value head with the query heads reading it (``"layer=3,kv_head=1"``; GQA-correct), or
per (component, head) with ``head_grouping="component"`` (``"layer=3,attn_q,head=5"``).

Per-group selection: a tensor's candidates are pre-filtered against the group's current k-th
key, then the k best are found with ``numpy.partition`` (O(n)) and the tie boundary is resolved
explicitly (every key above the k-th value, then the lowest flat indices among keys equal to
it), so no unstable top-k routine decides ties.

Rows: rank, parameter, flat_index, row, column (2-D: row-major indices; 1-D: row = index,
column = None; n-D: row = index along dim 0, column = flat offset inside that slice), layer,
component, head (None outside heads), score, weight_value (when ``weights`` is given), group.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cwa.errors import InvalidInput

RANK_MODES: tuple[str, ...] = ("global", "layer", "tensor", "head", "component")
RANK_COLUMNS: tuple[str, ...] = (
    "rank",
    "parameter",
    "flat_index",
    "row",
    "column",
    "layer",
    "component",
    "head",
    "score",
    "weight_value",
    "group",
)


@dataclass
class RunningTopK:
    """Exact running top-k of keys, ordered by (key desc, position asc, flat index asc).

    ``offer`` must be called with non-decreasing ``position`` (parameter order), so that on
    equal keys the entries already held always win over newly offered ones.
    """

    k: int
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))
    positions: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    flats: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # The raw scores of the held entries when the key is not the score itself (|score|).
    values: np.ndarray | None = None

    @property
    def full(self) -> bool:
        return self.keys.size >= self.k

    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.positions.nbytes + self.flats.nbytes)

    def offer(
        self,
        position: int,
        keys: np.ndarray,
        flats: np.ndarray | None = None,
        values: np.ndarray | None = None,
    ) -> None:
        """Offer candidates of one tensor: 1-D float32 ``keys`` (no NaN) at ``flats``.

        ``flats`` (ascending flat indices of ``keys`` inside the tensor) defaults to
        ``arange(len(keys))``; ``values`` (parallel to ``keys``) are raw scores kept beside
        the keys when they differ from them.
        """
        if keys.size == 0:
            return
        raw = values
        local: np.ndarray | None = None  # indices into ``keys`` still in the running
        if self.full:
            # Equal keys lose to held entries (earlier position), so strictly greater only.
            local = np.flatnonzero(keys > self.keys[-1])
            if local.size == 0:
                return
            keys = keys[local]
            raw = None if raw is None else raw[local]
        if keys.size > self.k:
            pick = _top_indices(keys, self.k)
            keys = keys[pick]
            raw = None if raw is None else raw[pick]
            local = pick if local is None else local[pick]
        elif local is None:
            local = np.arange(keys.size, dtype=np.int64)
        new_flats = local if flats is None else flats[local]
        # ``local`` is ascending, so a stable sort on -key orders ties by ascending flat index.
        order = np.argsort(-keys, kind="stable")
        merged_keys = np.concatenate([self.keys, keys[order]])
        merged_positions = np.concatenate(
            [self.positions, np.full(order.size, position, dtype=np.int64)]
        )
        merged_flats = np.concatenate([self.flats, new_flats[order].astype(np.int64)])
        # Held entries come first, so on equal keys the stable sort keeps them ahead.
        best = np.argsort(-merged_keys, kind="stable")[: self.k]
        self.keys = merged_keys[best]
        self.positions = merged_positions[best]
        self.flats = merged_flats[best]
        if raw is not None:
            held = self.values if self.values is not None else np.empty(0, dtype=np.float32)
            self.values = np.concatenate([held, raw[order]])[best]


def _top_indices(keys: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the k largest keys; ties at the boundary go to the lowest indices."""
    n = keys.size
    kth = np.partition(keys, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(keys > kth)
    ties = np.flatnonzero(keys == kth)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


RANK_KEYS: tuple[str, ...] = ("abs", "value")


def rank_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    arch: Any,
    *,
    k: int,
    mode: str = "global",
    bottom: bool = False,
    layers: Iterable[int] | None = None,
    components: Iterable[str] | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
    by: str = "value",
    head_grouping: str = "kv",
) -> list[dict[str, Any]]:
    """Rank score tensors given as (parameter name, tensor), in architecture order.

    The core of :func:`rank_scores`; ``tensors`` may be a lazy generator (it is consumed once,
    one tensor alive at a time). Tensors of parameters outside ``layers``/``components`` are
    skipped; names unknown to ``arch`` raise InvalidInput. ``by="abs"`` ranks by ``|score|``
    (rows still carry the raw score); groups follow :mod:`cwa.perturbation.groups`.
    """
    from cwa.models.architecture import resolve_components
    from cwa.perturbation.groups import check_head_grouping, element_groups

    if mode not in RANK_MODES:
        raise InvalidInput(f"unknown rank mode {mode!r}; use one of {', '.join(RANK_MODES)}")
    if by not in RANK_KEYS:
        raise InvalidInput(f"unknown ranking key {by!r}; use one of {', '.join(RANK_KEYS)}")
    check_head_grouping(head_grouping)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput(f"top-k must be a positive integer, got {k!r}")
    layers = None if layers is None else sorted({int(x) for x in layers})
    comps = resolve_components(components)
    in_scope = arch.select(layers=layers, components=comps)
    position_of = {name: i for i, name in enumerate(arch.params)}
    scope_set = set(in_scope)
    groups: dict[str, RunningTopK] = {}
    last_position = -1

    for name, tensor in tensors:
        if name not in position_of:
            raise InvalidInput(
                f"score tensor {name!r} is not a parameter of this model; rank a score run "
                "with the model it was scored on"
            )
        position = position_of[name]
        if position <= last_position:
            raise InvalidInput("score tensors must come in architecture (named_parameters) order")
        last_position = position
        if name not in scope_set:
            continue
        values = tensor.detach().to("cpu", torch.float32).numpy().reshape(-1)
        valid = ~np.isnan(values)
        if layers is not None or comps is not None:
            mask = arch.scope_mask(name, layers=layers, components=comps)
            if mask is not None:
                valid &= mask.numpy().reshape(-1)
        keys = np.abs(values) if by == "abs" else values
        keys = -keys if bottom else keys
        raw = values if by == "abs" else None
        labels, ids = element_groups(arch, name, mode, head_grouping)
        for i, label in enumerate(labels):
            member = valid if ids is None else valid & (ids == i)
            top = groups.setdefault(label, RunningTopK(k))
            if ids is None and bool(member.all()):
                top.offer(position, keys, None, raw)
            else:
                flats = np.flatnonzero(member)
                top.offer(position, keys[flats], flats, None if raw is None else raw[flats])
        del values, valid, keys, tensor
    return _rows(groups, bottom, arch, weights)


def _rows(
    groups: dict[str, RunningTopK],
    bottom: bool,
    arch: Any,
    weights: Mapping[str, torch.Tensor] | None,
) -> list[dict[str, Any]]:
    from cwa.models.architecture import COMPONENTS

    names = list(arch.params)
    rows: list[dict[str, Any]] = []
    wanted: dict[int, list[int]] = {}  # parameter position -> indices into ``rows``
    for label, top in groups.items():
        scores = (-top.keys if bottom else top.keys) if top.values is None else top.values
        ranked = zip(scores.tolist(), top.positions.tolist(), top.flats.tolist(), strict=True)
        for rank, (score, position, flat) in enumerate(ranked, start=1):
            info = arch.params[names[position]]
            if len(info.shape) >= 2:
                row, column = divmod(flat, info.numel // info.shape[0])
            else:
                row, column = flat, None
            wanted.setdefault(position, []).append(len(rows))
            rows.append(
                {
                    "rank": rank,
                    "parameter": info.name,
                    "flat_index": flat,
                    "row": row,
                    "column": column,
                    "layer": info.layer,
                    "component": info.components[0],
                    "head": None,
                    "score": score,
                    "weight_value": None,
                    "group": label,
                }
            )
    # Per-element lookups, gathered once per parameter (one device transfer for weights).
    for position, row_indices in wanted.items():
        name = names[position]
        info = arch.params[name]
        flats = torch.tensor([rows[i]["flat_index"] for i in row_indices], dtype=torch.long)
        if len(info.components) > 1:
            ids = arch.component_ids(name).reshape(-1)[flats].tolist()
            for i, component_id in zip(row_indices, ids, strict=True):
                rows[i]["component"] = COMPONENTS[component_id]
        if any(seg.n_heads is not None for seg in info.segments):
            heads = arch.head_ids(name).reshape(-1)[flats].tolist()
            for i, head in zip(row_indices, heads, strict=True):
                rows[i]["head"] = head if head >= 0 else None
        if weights is not None:
            if name not in weights:
                raise InvalidInput(f"no weight tensor given for parameter {name!r}")
            tensor = weights[name].detach()
            values = tensor.reshape(-1)[flats.to(tensor.device)].float().cpu().tolist()
            for i, value in zip(row_indices, values, strict=True):
                rows[i]["weight_value"] = value
    return rows


def _score_items(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from cwa.scorefile import open_scores

    with open_scores(path) as reader:
        for name in names:
            yield name, reader.get(name)


def rank_scores(
    score_path: str | Path,
    arch: Any,
    *,
    k: int,
    layers: Iterable[int] | None = None,
    components: Iterable[str] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Top-k (or bottom-k) weights of a score file, per ``mode`` group (see module docstring).

    ``arch`` is the ArchitectureMap of the scored model; ``options`` are those of
    :func:`rank_tensors` (``mode``, ``bottom``, ``weights`` -- e.g.
    ``dict(model.named_parameters())``, filling ``weight_value`` --, ``by``,
    ``head_grouping``). Only tensors in ``layers``/``components`` are read. Returns rows ordered
    by group (first appearance in parameter order) then rank.
    """
    from cwa.scorefile import read_score_header

    header, _ = read_score_header(score_path)
    unknown = [name for name in header if name not in arch.params]
    if unknown:
        raise InvalidInput(
            f"score file has tensor {unknown[0]!r} that this model lacks; rank a score run "
            "with the model it was scored on"
        )
    from cwa.models.architecture import resolve_components

    scope = arch.select(
        layers=None if layers is None else sorted({int(x) for x in layers}),
        components=resolve_components(components),
    )
    names = [name for name in scope if name in header]  # architecture order, in scope only
    items = _score_items(Path(score_path), names)
    return rank_tensors(items, arch, k=k, layers=layers, components=components, **options)


def ranking_frame(rows: list[dict[str, Any]]) -> Any:
    """Rows of :func:`rank_scores` as a polars DataFrame with a fixed schema."""
    import polars as pl

    schema = {
        "rank": pl.Int64,
        "parameter": pl.String,
        "flat_index": pl.Int64,
        "row": pl.Int64,
        "column": pl.Int64,
        "layer": pl.Int64,
        "component": pl.String,
        "head": pl.Int64,
        "score": pl.Float64,
        "weight_value": pl.Float64,
        "group": pl.String,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")
