"""Groups of a rank mode: which group every weight belongs to, in one place.

The ranking (:mod:`cwa.ranking`) ranks inside these groups and the matched controls draw inside
the very same groups, so both ask this module and cannot disagree. Labels:

- ``global``: one group, ``"all"``.
- ``tensor``: the parameter name.
- ``layer``: ``"layer=3"`` (``"layer=none"`` for embeddings, final norm, untied lm_head).
- ``component``: the component (``"attn_q"``, ...); a fused tensor (GPT-2 ``c_attn``) gives
  each element to its own component.
- ``head``: attention-head elements only (biases of the output projection and every
  non-attention tensor belong to no group). Two groupings:

  ``kv`` (default) — one group per key-value head, ``"layer=3,kv_head=1"``: the query heads
  that read that key-value head (``attn_q`` rows and the matching ``attn_o`` columns) together
  with the key-value head itself (``attn_k``/``attn_v`` rows). Under grouped-query attention
  (Llama-3, Mistral, Qwen2: ``G = n_heads / n_kv_heads`` query heads per key-value head) this
  is the smallest unit that can be removed from the forward pass on its own: perturbing a
  shared key/value head changes every query head reading it. Without GQA it is one head.

  ``component`` — one group per (component, head) in each component's own numbering,
  ``"layer=3,attn_q,head=5"`` (query heads for q/o, key-value heads for k/v).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cwa.errors import InvalidInput

HEAD_GROUPINGS: tuple[str, ...] = ("kv", "component")
_KV_SIDE = ("attn_k", "attn_v")


def check_head_grouping(head_grouping: str) -> str:
    if head_grouping not in HEAD_GROUPINGS:
        raise InvalidInput(
            f"unknown head grouping {head_grouping!r}; use one of {', '.join(HEAD_GROUPINGS)}"
        )
    return head_grouping


def _layer_text(layer: int | None) -> str:
    return "none" if layer is None else str(layer)


def element_groups(
    arch: Any, name: str, mode: str, head_grouping: str = "kv"
) -> tuple[list[str], np.ndarray | None]:
    """(labels, ids) of one parameter's elements under rank ``mode``.

    ``ids`` is None when the whole tensor is one group (``labels`` has one entry); otherwise an
    int64 array over the flat elements holding an index into ``labels``, or -1 for elements
    outside every group (non-head elements in head mode).
    """
    from cwa.models.architecture import COMPONENTS

    info = arch.params[name]
    if mode == "global":
        return ["all"], None
    if mode == "tensor":
        return [name], None
    if mode == "layer":
        return [f"layer={_layer_text(info.layer)}"], None
    if mode == "component":
        if len(info.components) == 1:
            return [info.components[0]], None
        comp_ids = arch.component_ids(name).numpy().reshape(-1).astype(np.int64)
        present = sorted(
            set(np.unique(comp_ids).tolist()), key=lambda c: info.components.index(COMPONENTS[c])
        )
        remap = np.full(len(COMPONENTS), -1, dtype=np.int64)
        for i, comp in enumerate(present):
            remap[comp] = i
        return [COMPONENTS[c] for c in present], remap[comp_ids]
    if mode != "head":
        raise InvalidInput(f"unknown rank mode {mode!r}")
    check_head_grouping(head_grouping)
    if not any(seg.n_heads is not None for seg in info.segments):
        return [], np.full(info.numel, -1, dtype=np.int64)
    heads = arch.head_ids(name).numpy().reshape(-1).astype(np.int64)
    comp_ids = arch.component_ids(name).numpy().reshape(-1).astype(np.int64)
    layer = _layer_text(info.layer)
    if head_grouping == "kv":
        kv_side = np.isin(comp_ids, [COMPONENTS.index(c) for c in _KV_SIDE])
        group = np.where(kv_side, heads, heads // arch.group_size)
        group[heads < 0] = -1
        present = np.unique(group[group >= 0])
        remap = np.full(int(present.max()) + 1 if present.size else 1, -1, dtype=np.int64)
        remap[present] = np.arange(present.size)
        ids = np.where(group >= 0, remap[np.maximum(group, 0)], -1)
        return [f"layer={layer},kv_head={int(g)}" for g in present], ids
    # (component, head): one key per pair, in order of appearance.
    key = np.where(heads >= 0, comp_ids * (1 << 20) + heads, -1)
    present, first = np.unique(key[key >= 0], return_index=True)
    ordered = present[np.argsort(first, kind="stable")]
    lookup = {int(k): i for i, k in enumerate(ordered)}
    labels = [
        f"layer={layer},{COMPONENTS[int(k) >> 20]},head={int(k) & ((1 << 20) - 1)}" for k in ordered
    ]
    ids = np.full(key.shape, -1, dtype=np.int64)
    for k_value, i in lookup.items():
        ids[key == k_value] = i
    return labels, ids


class GroupScopes(Mapping[str, list[Any]]):
    """Group label -> the scope entries (with masks) of that group's in-scope elements.

    Built on access: only the tensors holding each group are remembered, and a group's masks
    exist while its entries are in use. A head ranking of a 7B model has hundreds of groups
    whose full-size masks would not fit in memory at once (see ``bottom_k_by_group``, which
    works through them a few tensors at a time). Groups iterate in order of first appearance
    in the scope; inside a group, entries keep the scope's order.
    """

    def __init__(self, arch: Any, scope: Sequence[Any], mode: str, head_grouping: str) -> None:
        self._arch, self._mode, self._head_grouping = arch, mode, head_grouping
        self._members: dict[str, list[Any]] = {}  # label -> scope entries holding part of it
        for entry in scope:
            labels, ids = element_groups(arch, entry.name, mode, head_grouping)
            if ids is not None:
                in_scope = ids if entry.mask is None else ids[entry.mask.numpy()]
                present = set(np.unique(in_scope[in_scope >= 0]).tolist())
                labels = [label for i, label in enumerate(labels) if i in present]
            for label in labels:
                self._members.setdefault(label, []).append(entry)

    def tensor_names(self, label: str) -> tuple[str, ...]:
        """Names of the parameters holding part of group ``label`` (no masks built)."""
        return tuple(entry.name for entry in self._members[label])

    def __getitem__(self, label: str) -> list[Any]:
        from cwa.perturbation.scope import ScopeEntry

        out = []
        for entry in self._members[label]:
            labels, ids = element_groups(self._arch, entry.name, self._mode, self._head_grouping)
            if ids is None:
                out.append(ScopeEntry(entry.name, entry.numel, entry.mask))
                continue
            member = ids == labels.index(label)
            if entry.mask is not None:
                member &= entry.mask.numpy()
            out.append(ScopeEntry(entry.name, entry.numel, torch.from_numpy(member)))
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, label: object) -> bool:
        return label in self._members


def group_scopes(
    arch: Any, scope: Sequence[Any], mode: str, head_grouping: str = "kv"
) -> GroupScopes:
    """The groups of rank ``mode`` over ``scope`` (see :class:`GroupScopes`)."""
    return GroupScopes(arch, scope, mode, head_grouping)


def count_by_group(
    selection: Mapping[str, torch.Tensor], arch: Any, mode: str, head_grouping: str = "kv"
) -> dict[str, int]:
    """Selected weights per group label (``"(no group)"`` for weights outside every group)."""
    counts: dict[str, int] = {}
    for name, idx in selection.items():
        n = int(idx.numel())
        if not n:
            continue
        labels, ids = element_groups(arch, name, mode, head_grouping)
        if ids is None:
            counts[labels[0]] = counts.get(labels[0], 0) + n
            continue
        chosen = ids[idx.cpu().numpy()]
        outside = int((chosen < 0).sum())
        if outside:
            counts["(no group)"] = counts.get("(no group)", 0) + outside
        for i, c in enumerate(np.bincount(chosen[chosen >= 0], minlength=len(labels)).tolist()):
            if c:
                counts[labels[i]] = counts.get(labels[i], 0) + c
    return counts
