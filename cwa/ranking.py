"""Exact top-k / bottom-k rankings of per-weight scores, streamed tensor by tensor.

:func:`rank_scores` reads a score file one tensor at a time and keeps, per group, only a running
set of at most k candidates; all scores are never concatenated (DESIGN.md "Performance rules").
Extra memory is O(k * groups) for the running sets plus a few temporaries of the size of the
tensor being read.

Order (exact, including ties): higher score first; among equal scores the parameter that comes
first in the architecture map (``named_parameters()`` order) wins, then the lower flat index.
``bottom=True`` ranks lowest scores first with the same tie rule. NaN scores mean "not scored"
(out-of-scope elements of a partly selected tensor) and are never ranked; ``layers`` /
``components`` narrow the ranking further through the architecture map.

Modes and their groups (``rank`` counts from 1 inside each group; ``group`` names it):

- ``global``: one group, ``"all"``.
- ``tensor``: one group per parameter (the parameter name).
- ``layer``: one group per layer index (``"layer=3"``; ``"layer=none"`` for tensors outside the
  layer stack: embeddings, final norm, untied lm_head).
- ``component``: one group per component (``"attn_q"``, ...); a fused tensor (GPT-2 ``c_attn``)
  contributes each element to its own component's group.
- ``head``: one group per (layer, head) over the elements the architecture map assigns to an
  attention head (``"layer=3,head=5"``); elements outside heads (output-projection bias,
  non-attention tensors) are not ranked. The head number is the map's: a query head for
  attn_q/attn_o elements, a key/value head for attn_k/attn_v (they coincide without GQA).

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

    @property
    def full(self) -> bool:
        return self.keys.size >= self.k

    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.positions.nbytes + self.flats.nbytes)

    def offer(self, position: int, keys: np.ndarray, flats: np.ndarray | None = None) -> None:
        """Offer candidates of one tensor: 1-D float32 ``keys`` (no NaN) at ``flats``.

        ``flats`` (ascending flat indices of ``keys`` inside the tensor) defaults to
        ``arange(len(keys))``.
        """
        if keys.size == 0:
            return
        local: np.ndarray | None = None  # indices into ``keys`` still in the running
        if self.full:
            # Equal keys lose to held entries (earlier position), so strictly greater only.
            local = np.flatnonzero(keys > self.keys[-1])
            if local.size == 0:
                return
            keys = keys[local]
        if keys.size > self.k:
            pick = _top_indices(keys, self.k)
            keys = keys[pick]
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


def _top_indices(keys: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the k largest keys; ties at the boundary go to the lowest indices."""
    n = keys.size
    kth = np.partition(keys, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(keys > kth)
    ties = np.flatnonzero(keys == kth)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


def _group_label(mode: str, group: Any) -> str:
    if mode == "global":
        return "all"
    if mode == "layer":
        return f"layer={'none' if group is None else group}"
    if mode == "head":
        layer, head = group
        return f"layer={'none' if layer is None else layer},head={head}"
    return str(group)


def _has_heads(info: Any) -> bool:
    return any(seg.n_heads is not None for seg in info.segments)


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
) -> list[dict[str, Any]]:
    """Rank score tensors given as (parameter name, tensor), in architecture order.

    The core of :func:`rank_scores`; ``tensors`` may be a lazy generator (it is consumed once,
    one tensor alive at a time). Tensors of parameters outside ``layers``/``components`` are
    skipped; names unknown to ``arch`` raise InvalidInput.
    """
    from cwa.models.architecture import COMPONENTS, resolve_components

    if mode not in RANK_MODES:
        raise InvalidInput(f"unknown rank mode {mode!r}; use one of {', '.join(RANK_MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput(f"top-k must be a positive integer, got {k!r}")
    layers = None if layers is None else sorted({int(x) for x in layers})
    comps = resolve_components(components)
    in_scope = arch.select(layers=layers, components=comps)
    position_of = {name: i for i, name in enumerate(arch.params)}
    scope_set = set(in_scope)
    groups: dict[Any, RunningTopK] = {}
    last_position = -1

    def group_for(key: Any) -> RunningTopK:
        if key not in groups:
            groups[key] = RunningTopK(k)
        return groups[key]

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
        info = arch.params[name]
        values = tensor.detach().to("cpu", torch.float32).numpy().reshape(-1)
        valid = ~np.isnan(values)
        mask = None
        if layers is not None or comps is not None:
            mask = arch.scope_mask(name, layers=layers, components=comps)
        if mask is not None:
            valid &= mask.numpy().reshape(-1)
        keys = -values if bottom else values
        whole = bool(valid.all())
        if mode in ("global", "tensor", "layer") or (
            mode == "component" and len(info.components) == 1
        ):
            key = {
                "global": None,
                "tensor": name,
                "layer": info.layer,
                "component": info.components[0],
            }[mode]
            if whole:
                group_for(key).offer(position, keys)
            else:
                flats = np.flatnonzero(valid)
                group_for(key).offer(position, keys[flats], flats)
        elif mode == "component":
            ids = arch.component_ids(name).numpy().reshape(-1)
            for comp in info.components:
                flats = np.flatnonzero(valid & (ids == COMPONENTS.index(comp)))
                group_for(comp).offer(position, keys[flats], flats)
        elif _has_heads(info):  # head mode
            heads = arch.head_ids(name).numpy().reshape(-1)
            for head in np.unique(heads[valid & (heads >= 0)]).tolist():
                flats = np.flatnonzero(valid & (heads == head))
                group_for((info.layer, int(head))).offer(position, keys[flats], flats)
        del values, valid, keys, tensor
    return _rows(groups, mode, bottom, arch, weights)


def _rows(
    groups: dict[Any, RunningTopK],
    mode: str,
    bottom: bool,
    arch: Any,
    weights: Mapping[str, torch.Tensor] | None,
) -> list[dict[str, Any]]:
    from cwa.models.architecture import COMPONENTS

    names = list(arch.params)
    rows: list[dict[str, Any]] = []
    wanted: dict[int, list[int]] = {}  # parameter position -> indices into ``rows``
    for group_key, top in groups.items():
        label = _group_label(mode, group_key)
        ranked = zip(top.keys.tolist(), top.positions.tolist(), top.flats.tolist(), strict=True)
        for rank, (key, position, flat) in enumerate(ranked, start=1):
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
                    "score": -key if bottom else key,
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
        if _has_heads(info):
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
    mode: str = "global",
    bottom: bool = False,
    layers: Iterable[int] | None = None,
    components: Iterable[str] | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Top-k (or bottom-k) weights of a score file, per ``mode`` group (see module docstring).

    ``arch`` is the ArchitectureMap of the scored model; ``weights`` (e.g.
    ``dict(model.named_parameters())``) fills ``weight_value``. Returns rows ordered by group
    (first appearance in parameter order) then rank.
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
    return rank_tensors(
        _score_items(Path(score_path), names),
        arch,
        k=k,
        mode=mode,
        bottom=bottom,
        layers=layers,
        components=components,
        weights=weights,
    )


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
