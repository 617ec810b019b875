"""Architecture map: every parameter of a causal LM to (layer, component, attention head).

Scoring, ranking, perturbation and analysis all need to know what a weight *is*: which
transformer layer it sits in, whether it belongs to the query/key/value/output projection,
an MLP matrix, a norm or an embedding, and for attention weights which head it feeds.
Fused tensors are split logically, without copying, into :class:`Segment` blocks:

* GPT-2 ``c_attn`` is a ``Conv1D`` of shape ``[in, 3*d]`` holding ``[Q|K|V]`` along its last
  axis; its ``c_proj`` is ``[d, out]`` (heads along the first axis).
* GPT-NeoX/Pythia ``query_key_value`` is ``[3*d, in]`` interleaved per head: the output is
  viewed as ``[n_heads, 3*head_dim]`` and chunked into q, k, v, so rows
  ``h*3*hd + [0, hd)`` are q of head ``h``, the next ``hd`` rows k, the next ``hd`` rows v.
* Phi-3 ``qkv_proj`` is ``[Q | K | V]`` contiguous along the output rows (``K`` and ``V`` with
  ``n_kv_heads`` heads) and ``gate_up_proj`` is ``[gate | up]``.
* Llama-style models (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, OPT) have separate
  ``nn.Linear`` projections; with grouped-query attention ``k_proj``/``v_proj`` have
  ``n_kv_heads`` heads, and kv head ``g`` serves query heads
  ``g*group .. (g+1)*group - 1`` (``group = n_heads // n_kv_heads``).

Head ids: for ``attn_q`` and ``attn_o`` an element's head id is the *query* head it feeds; for
``attn_k`` and ``attn_v`` it is the *key/value* head index (so in GQA models it ranges over
``n_kv_heads``). Biases of q/k/v belong to heads too; the output projection's bias does not
(it is added after the heads are summed) and gets head id -1. Qwen3's ``q_norm``/``k_norm``
are shared by all heads and mapped to ``norm``.

Tied output embeddings do not appear in ``named_parameters()``; the embedding's
:class:`ParamInfo` names the tied alias in ``tied_to`` and every weight is counted once.

Models of other families get a name-pattern fallback (``is_fallback=True``) that never
guesses the layout of a fused tensor (it maps those to ``other`` and says so in ``notes``).

This module holds the map and its queries (components, heads, scopes, summaries); the
per-family layout rules and :func:`build_architecture_map` live in
:mod:`cwa.models.layout` (re-exported here).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cwa.errors import InvalidInput
from cwa.models.segments import (  # the map's vocabulary, re-exported
    COMPONENT_GROUPS,
    COMPONENT_INDEX,
    COMPONENTS,
    HEAD_COMPONENTS,
    KV_COMPONENTS,
    ParamInfo,
    Segment,
    _axis_profile,
    _block,
    _expand_along,
    _fill_segment,
    resolve_components,
)


@dataclass
class ArchitectureMap:
    """Per-parameter layer/component/head map of one model (see module docstring)."""

    family: str
    is_fallback: bool
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    params: dict[str, ParamInfo]
    tied: dict[str, str] = field(default_factory=dict)  # tied alias -> stored parameter name
    notes: list[str] = field(default_factory=list)

    # -- sizes ------------------------------------------------------------------------
    @property
    def total_params(self) -> int:
        """Parameter count with tied tensors counted once."""
        return sum(info.numel for info in self.params.values())

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return max(1, self.n_heads // max(1, self.n_kv_heads))

    def kv_head_of(self, q_head: int) -> int:
        """The key/value head that query head ``q_head`` reads."""
        self._check_head(q_head, self.n_heads)
        return q_head // self.group_size

    def q_heads_of_kv(self, kv_head: int) -> list[int]:
        """The query heads that share key/value head ``kv_head``."""
        self._check_head(kv_head, self.n_kv_heads)
        g = self.group_size
        return list(range(kv_head * g, (kv_head + 1) * g))

    def component_counts(self) -> dict[str, int]:
        """Total elements per component (every component present, zeros included)."""
        counts = dict.fromkeys(COMPONENTS, 0)
        for info in self.params.values():
            for seg in info.segments:
                counts[seg.component] += seg.numel(info.shape)
        return counts

    # -- per-element tensors ----------------------------------------------------------
    def _info(self, name: str) -> ParamInfo:
        try:
            return self.params[name]
        except KeyError:
            if name in self.tied:
                return self.params[self.tied[name]]
            close = difflib.get_close_matches(name, list(self.params), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InvalidInput(f"no parameter named {name!r} in this model{hint}") from None

    def component_ids(self, name: str) -> torch.Tensor:
        """int8 tensor of the parameter's shape: index into :data:`COMPONENTS` per element."""
        info = self._info(name)
        if len(info.segments) == 1:
            return torch.full(
                info.shape, COMPONENT_INDEX[info.segments[0].component], dtype=torch.int8
            )
        profile = _axis_profile(info)
        if profile is not None:
            return _expand_along(profile[1], profile[0], info.shape)
        out = torch.empty(info.shape, dtype=torch.int8)
        for seg in info.segments:
            _fill_segment(out, seg, COMPONENT_INDEX[seg.component])
        return out

    def head_ids(self, name: str) -> torch.Tensor:
        """int32 tensor of the parameter's shape: head per element, -1 outside any head.

        q and o elements carry the query head index, k and v elements the key/value head index.
        """
        info = self._info(name)
        profile = _axis_profile(info)
        if profile is not None:
            return _expand_along(profile[2], profile[0], info.shape)
        out = torch.full(info.shape, -1, dtype=torch.int32)
        for seg in info.segments:
            if seg.n_heads is None or seg.head_dim is None or seg.head_axis is None:
                continue
            axis = seg.head_axis
            n_local = seg.length(info.shape) if seg.dim == axis else info.shape[axis]
            bshape = [1] * len(info.shape)
            bshape[axis] = n_local
            heads = (torch.arange(n_local, dtype=torch.int32) // seg.head_dim).view(bshape)
            view, index = _block(out, seg)
            if view is not None:
                view.copy_(heads.expand_as(view))
            else:
                assert seg.dim is not None and index is not None
                block_shape = list(info.shape)
                block_shape[seg.dim] = len(seg.index or ())
                out.index_copy_(seg.dim, index, heads.expand(block_shape).contiguous())
        return out

    def _head_mask(self, name: str, head: int, comps: tuple[str, ...]) -> torch.Tensor | None:
        """Bool mask of ``head``'s elements among ``comps`` in one parameter (None: none)."""
        info = self.params[name]
        mask: torch.Tensor | None = None
        for seg in info.segments:
            if seg.component not in comps or seg.n_heads is None or head >= seg.n_heads:
                continue
            assert seg.head_dim is not None and seg.head_axis is not None
            if mask is None:
                mask = torch.zeros(info.shape, dtype=torch.bool)
            lo = head * seg.head_dim
            if seg.dim is None:
                mask.narrow(seg.head_axis, lo, seg.head_dim).fill_(True)
            elif seg.dim == seg.head_axis and seg.index is not None:
                rows = torch.tensor(seg.index[lo : lo + seg.head_dim], dtype=torch.long)
                mask.index_fill_(seg.dim, rows, True)
            elif seg.dim == seg.head_axis:
                mask.narrow(seg.dim, seg.start + lo, seg.head_dim).fill_(True)
            else:  # block cut along one axis, heads along another: general element test
                in_seg = torch.zeros(info.shape, dtype=torch.bool)
                _fill_segment(in_seg, seg, True)
                mask |= in_seg & (self.head_ids(name) == head)
        return mask

    def _check_head(self, head: int, limit: int) -> None:
        if not 0 <= head < limit:
            raise InvalidInput(f"head {head} is out of range; this model has heads 0..{limit - 1}")

    def _check_layer(self, layer: int) -> int:
        if -self.n_layers <= layer < self.n_layers:
            return layer % self.n_layers
        raise InvalidInput(
            f"layer {layer} is out of range; this model has layers 0..{self.n_layers - 1}"
        )

    def head_elements(
        self,
        layer: int,
        head: int,
        components: Iterable[str] = HEAD_COMPONENTS,
    ) -> dict[str, torch.Tensor]:
        """Bool masks of the elements of ``head`` in ``layer``, per parameter that has any.

        ``head`` is read in each component's own numbering: a query head for ``attn_q`` and
        ``attn_o``, a key/value head for ``attn_k`` and ``attn_v`` (identical without GQA).
        Components whose heads do not reach ``head`` (k/v beyond ``n_kv_heads``) contribute
        nothing.
        """
        comps = resolve_components(components) or ()
        layer = self._check_layer(layer)
        self._check_head(head, max(self.n_heads, self.n_kv_heads))
        masks: dict[str, torch.Tensor] = {}
        for name, info in self.params.items():
            if info.layer != layer:
                continue
            mask = self._head_mask(name, head, comps)
            if mask is not None:
                masks[name] = mask
        return masks

    # -- scoping ----------------------------------------------------------------------
    def _normalise_layers(self, layers: Iterable[int] | None) -> set[int] | None:
        if layers is None:
            return None
        return {self._check_layer(int(layer)) for layer in layers}

    def select(
        self,
        layers: Iterable[int] | None = None,
        components: Iterable[str] | None = None,
    ) -> list[str]:
        """Names of parameters wholly or partly in scope, in ``named_parameters()`` order.

        ``layers=None`` means every parameter; a list of layers (negative indices count from
        the end) excludes parameters outside the layer stack (embeddings, final norm, lm_head).
        ``components=None`` means every component.
        """
        layer_set = self._normalise_layers(layers)
        comps = resolve_components(components)
        chosen: list[str] = []
        for name, info in self.params.items():
            if layer_set is not None and info.layer not in layer_set:
                continue
            if comps is not None and not any(s.component in comps for s in info.segments):
                continue
            chosen.append(name)
        return chosen

    def scope_mask(
        self,
        name: str,
        layers: Iterable[int] | None = None,
        components: Iterable[str] | None = None,
    ) -> torch.Tensor | None:
        """Bool mask of the parameter's elements in scope; None when the whole tensor is in."""
        info = self._info(name)
        layer_set = self._normalise_layers(layers)
        comps = resolve_components(components)
        if layer_set is not None and info.layer not in layer_set:
            return torch.zeros(info.shape, dtype=torch.bool)
        if comps is None or all(s.component in comps for s in info.segments):
            return None
        mask = torch.zeros(info.shape, dtype=torch.bool)
        for seg in info.segments:
            if seg.component in comps:
                _fill_segment(mask, seg, True)
        return mask

    # -- reporting --------------------------------------------------------------------
    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per (layer, component) present: parameter count, tensor count, heads, head dim.

        Rows outside the layer stack have ``layer=None``; rows are ordered embeddings first,
        then layers in order, then final norm and lm_head, components in :data:`COMPONENTS`
        order.
        """
        rows: dict[tuple[int | None, str], dict[str, Any]] = {}
        counted: set[tuple[int | None, str, str]] = set()
        for name, info in self.params.items():
            for seg in info.segments:
                key = (info.layer, seg.component)
                row = rows.setdefault(
                    key,
                    {
                        "layer": info.layer,
                        "component": seg.component,
                        "n_params": 0,
                        "n_heads": None,
                        "head_dim": None,
                        "n_tensors": 0,
                    },
                )
                row["n_params"] += seg.numel(info.shape)
                if (info.layer, seg.component, name) not in counted:
                    counted.add((info.layer, seg.component, name))
                    row["n_tensors"] += 1
                if seg.n_heads is not None:
                    row["n_heads"] = seg.n_heads
                    row["head_dim"] = seg.head_dim

        def order(key: tuple[int | None, str]) -> tuple[int, int]:
            layer, comp = key
            if layer is None:
                early = comp in ("embed", "pos_embed")
                position = -1 if early else self.n_layers
            else:
                position = layer
            return position, COMPONENT_INDEX[comp]

        return [rows[k] for k in sorted(rows, key=order)]


def inspect_model(target: Any) -> dict[str, Any]:
    """Summary of a model's architecture map for ``cwa model inspect``.

    ``target`` is a :class:`~cwa.models.loading.LoadedModel`, an :class:`ArchitectureMap` or a
    ``torch.nn.Module``. Returns a JSON-ready dict: family, fallback flag, sizes, total
    parameters, per-component totals, notes, and ``rows`` (layer x component with parameter
    counts, head counts and head dims; see :meth:`ArchitectureMap.summary_rows`).
    """
    extra: dict[str, Any] = {}
    if isinstance(target, ArchitectureMap):
        arch = target
    elif isinstance(target, nn.Module):
        arch = build_architecture_map(target)
    elif isinstance(getattr(target, "arch", None), ArchitectureMap):
        arch = target.arch
        for key in ("ref", "path", "fingerprint", "device", "dtype", "attn_implementation"):
            extra[key] = getattr(target, key, None)
    else:
        raise InvalidInput(
            f"cannot inspect a {type(target).__name__}; pass a LoadedModel, an ArchitectureMap "
            "or a torch.nn.Module"
        )
    counts = arch.component_counts()
    return {
        **extra,
        "family": arch.family,
        "is_fallback": arch.is_fallback,
        "n_layers": arch.n_layers,
        "n_heads": arch.n_heads,
        "n_kv_heads": arch.n_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_size": arch.hidden_size,
        "total_params": arch.total_params,
        "tied_embeddings": bool(arch.tied),
        "tied": dict(arch.tied),
        "component_totals": {c: n for c, n in counts.items() if n},
        "notes": list(arch.notes),
        "rows": arch.summary_rows(),
    }


# The layout rules build maps of the classes above; imported last (they import this module).
from cwa.models.layout import (  # noqa: E402
    SUPPORTED_FAMILIES,
    build_architecture_map,
    parse_layer_index,
)

__all__ = [
    "COMPONENTS",
    "COMPONENT_GROUPS",
    "COMPONENT_INDEX",
    "HEAD_COMPONENTS",
    "KV_COMPONENTS",
    "SUPPORTED_FAMILIES",
    "ArchitectureMap",
    "ParamInfo",
    "Segment",
    "build_architecture_map",
    "inspect_model",
    "parse_layer_index",
    "resolve_components",
]
