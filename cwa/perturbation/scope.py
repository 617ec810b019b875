"""Scopes: the set of weights a selection may draw from.

A scope is an ordered list of :class:`ScopeEntry` — a parameter name, its element count and,
for tensors only partly in scope (a fused ``c_attn`` of which only the query block is targeted,
the elements of one attention head, ...), a flat boolean mask of the in-scope elements. The
ranking, the treatment and every control of one experiment share one scope, so that a control
is drawn from exactly the tensors, components, layers and heads the ranking covered.

The order of the entries is part of the scope: it fixes the global numbering that
``random_k`` samples from and the tie order of ``bottom_k``. Builders here use the model's
``named_parameters()`` order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cwa.errors import InvalidInput

NamedParams = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]

ATTENTION_COMPONENTS = ("attn_q", "attn_k", "attn_v", "attn_o")


@dataclass
class ScopeEntry:
    """One parameter in a scope; ``mask`` (flat bool, ``numel`` long) marks in-scope elements.

    ``mask=None`` means the whole tensor is in scope. A mask that is all True is normalised to
    None; ``count`` is the number of in-scope elements.
    """

    name: str
    numel: int
    mask: torch.Tensor | None = None
    count: int = field(init=False)

    def __post_init__(self) -> None:
        self.numel = int(self.numel)
        if self.numel < 0:
            raise InvalidInput(f"scope entry {self.name!r} has a negative size {self.numel}")
        if self.mask is not None:
            mask = self.mask.detach().reshape(-1)
            if mask.dtype != torch.bool:
                raise InvalidInput(
                    f"scope mask of {self.name!r} has dtype {mask.dtype}; pass a bool mask"
                )
            if mask.numel() != self.numel:
                raise InvalidInput(
                    f"scope mask of {self.name!r} has {mask.numel()} elements but the parameter "
                    f"has {self.numel}; build the mask with the parameter's shape"
                )
            mask = mask.cpu()
            count = int(mask.sum())
            self.mask = None if count == self.numel else mask
            self.count = count
        else:
            self.count = self.numel

    def flat_positions(self) -> torch.Tensor:
        """Sorted flat indices (int64, CPU) of every in-scope element."""
        if self.mask is None:
            return torch.arange(self.numel, dtype=torch.int64)
        return self.mask.nonzero().view(-1)

    def contains(self, flat: torch.Tensor) -> torch.Tensor:
        """Bool tensor: which of ``flat`` (int64 flat indices) are in scope."""
        inside = (flat >= 0) & (flat < self.numel)
        if self.mask is None:
            return inside
        result = torch.zeros_like(inside)
        result[inside] = self.mask[flat[inside]]
        return result


def scope_size(scope: Sequence[ScopeEntry]) -> int:
    """Number of in-scope weights."""
    return sum(entry.count for entry in scope)


def check_scope(scope: Sequence[ScopeEntry]) -> list[ScopeEntry]:
    """The scope as a list, after checking that no parameter appears twice."""
    entries = list(scope)
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InvalidInput(
            f"scope lists {', '.join(dupes)} more than once; merge their masks into one entry"
        )
    return entries


def describe_scope(scope: Sequence[ScopeEntry]) -> dict[str, Any]:
    """JSON-able summary of a scope (for run configs): sizes per tensor and in total."""
    return {
        "n_tensors": len(scope),
        "n_weights": scope_size(scope),
        "tensors": {e.name: {"numel": e.numel, "in_scope": e.count} for e in scope},
    }


def named_parameter_dict(target: NamedParams) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``({name: tensor}, {alias: canonical name})`` for a model or a name->tensor mapping.

    For a module, tied parameters are listed once under their first name (as
    ``named_parameters()`` does) and their other names are returned as aliases.
    """
    if isinstance(target, torch.nn.Module):
        params = dict(target.named_parameters())
        first_name = {id(p): n for n, p in params.items()}
        aliases = {
            n: first_name[id(p)]
            for n, p in target.named_parameters(remove_duplicate=False)
            if n not in params and id(p) in first_name
        }
        return params, aliases
    items = target.items() if isinstance(target, Mapping) else target
    params = {}
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise InvalidInput(f"{name!r} is not a tensor; pass a model or name -> tensor pairs")
        params[name] = tensor
    return params, {}


def scope_from_params(target: NamedParams, names: Iterable[str] | None = None) -> list[ScopeEntry]:
    """Whole tensors as a scope: all parameters, or ``names`` (in the model's order)."""
    params, aliases = named_parameter_dict(target)
    if names is None:
        return [ScopeEntry(n, t.numel()) for n, t in params.items()]
    wanted = list(names)
    unknown = [n for n in wanted if n not in params]
    if unknown:
        hint = [f"{n} (tied to {aliases[n]})" for n in unknown if n in aliases]
        raise InvalidInput(
            f"not parameters of the model: {', '.join(unknown)}"
            + (f"; use the first name of tied weights: {', '.join(hint)}" if hint else "")
        )
    wanted_set = set(wanted)
    return [ScopeEntry(n, t.numel()) for n, t in params.items() if n in wanted_set]


def _head_masks(
    arch: Any, layer: int, head: int, components: tuple[str, ...], kv_groups: bool
) -> list[tuple[str, torch.Tensor]]:
    if not kv_groups:
        return list(arch.head_elements(layer, head, components=components).items())
    kv_side = tuple(c for c in components if c in ("attn_k", "attn_v"))
    q_side = tuple(c for c in components if c in ("attn_q", "attn_o"))
    out = list(arch.head_elements(layer, head, components=kv_side).items()) if kv_side else []
    for q_head in arch.q_heads_of_kv(head):  # raises for a key-value head the model lacks
        if q_side:
            out += list(arch.head_elements(layer, q_head, components=q_side).items())
    return out


def scope_from_architecture(
    arch: Any,
    *,
    layers: Iterable[int] | None = None,
    components: Iterable[str] | None = None,
    heads: Iterable[tuple[int, int]] | None = None,
    kv_groups: bool = False,
) -> list[ScopeEntry]:
    """The scope of an :class:`~cwa.models.architecture.ArchitectureMap` restricted to
    ``layers``, ``components`` and (optionally) attention ``heads`` given as (layer, head).

    An element is in scope when it is in the given layers and components and, if ``heads``
    is given, belongs to one of those heads (the union of their elements). By default the head
    is read in each component's own numbering (query head for q/o, key-value head for k/v, as
    in the architecture map); with ``kv_groups=True`` it is a key-value head J together with
    the query heads that read it (their q rows and o columns): the head groups of
    ``cwa rank --mode head``, correct under grouped-query attention. Raises
    :class:`~cwa.errors.InvalidInput` when nothing is left.
    """
    layer_list = None if layers is None else list(layers)
    component_list = None if components is None else list(components)
    head_list = None if heads is None else [(int(la), int(h)) for la, h in heads]
    head_union: dict[str, torch.Tensor] | None = None
    if head_list is not None:
        head_components = tuple(
            c for c in (component_list or ATTENTION_COMPONENTS) if c in ATTENTION_COMPONENTS
        )
        if not head_components:
            raise InvalidInput(
                "heads were given but none of the components is an attention component; "
                f"add one of {', '.join(ATTENTION_COMPONENTS)}"
            )
        head_union = {}
        for layer, head in head_list:
            for name, mask in _head_masks(arch, layer, head, head_components, kv_groups):
                mask = mask.detach().reshape(-1).cpu()
                head_union[name] = mask if name not in head_union else head_union[name] | mask
    entries = []
    for name in arch.select(layers=layer_list, components=component_list):
        numel = int(arch.params[name].numel)
        mask = arch.scope_mask(name, layers=layer_list, components=component_list)
        if mask is not None:
            mask = mask.detach().reshape(-1).cpu()
        if head_union is not None:
            if name not in head_union:
                continue
            mask = head_union[name] if mask is None else mask & head_union[name]
        entry = ScopeEntry(name, numel, mask)
        if entry.count:
            entries.append(entry)
    if not entries:
        raise InvalidInput(
            f"no weights in scope (layers={layer_list}, components={component_list}, "
            f"heads={head_list}); check them with `cwa inspect`"
        )
    return entries


def rows_in_scope(frame: Any, scope: Sequence[ScopeEntry]) -> Any:
    """Rows of a ranking frame (columns ``parameter``, ``flat_index``) whose weight lies in
    ``scope`` (vectorised per parameter)."""
    import numpy as np
    import polars as pl

    keep = np.zeros(frame.height, dtype=bool)
    names = frame["parameter"].to_numpy()
    flat = frame["flat_index"].to_numpy()
    for entry in scope:
        rows = np.flatnonzero(names == entry.name)
        if rows.size == 0:
            continue
        keep[rows] = True if entry.mask is None else entry.mask.numpy()[flat[rows]]
    return frame.filter(pl.Series(keep))
