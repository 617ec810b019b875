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
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from cwa.errors import InvalidInput, UnknownComponent, UnsupportedArchitecture

COMPONENTS: tuple[str, ...] = (
    "embed",
    "pos_embed",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "mlp_up",
    "mlp_gate",
    "mlp_down",
    "norm",
    "lm_head",
    "other",
)
COMPONENT_INDEX: dict[str, int] = {name: i for i, name in enumerate(COMPONENTS)}

# Convenience names accepted wherever a list of components is (expanded before use).
COMPONENT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn_q", "attn_k", "attn_v", "attn_o"),
    "attention": ("attn_q", "attn_k", "attn_v", "attn_o"),
    "qkv": ("attn_q", "attn_k", "attn_v"),
    "mlp": ("mlp_up", "mlp_gate", "mlp_down"),
    "embeddings": ("embed", "pos_embed"),
}

HEAD_COMPONENTS: tuple[str, ...] = ("attn_q", "attn_k", "attn_v", "attn_o")
KV_COMPONENTS: frozenset[str] = frozenset({"attn_k", "attn_v"})

# model_type -> family name used in the map (the supported, functionally tested ones).
SUPPORTED_FAMILIES: dict[str, str] = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "opt": "opt",
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
}


def resolve_components(components: Iterable[str] | str | None) -> tuple[str, ...] | None:
    """Validate component names (and expand groups such as ``attn``/``mlp``).

    ``None`` means "all components" and is returned unchanged. Raises
    :class:`~cwa.errors.UnknownComponent` naming close matches and the valid names.
    """
    if components is None:
        return None
    if isinstance(components, str):
        components = [components]
    resolved: list[str] = []
    for raw in components:
        name = raw.strip()
        if name in COMPONENT_INDEX:
            expanded: tuple[str, ...] = (name,)
        elif name in COMPONENT_GROUPS:
            expanded = COMPONENT_GROUPS[name]
        else:
            valid = list(COMPONENTS) + list(COMPONENT_GROUPS)
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UnknownComponent(
                f"unknown component {name!r}; {hint}valid components: {', '.join(COMPONENTS)} "
                f"(groups: {', '.join(COMPONENT_GROUPS)})"
            )
        for comp in expanded:
            if comp not in resolved:
                resolved.append(comp)
    return tuple(resolved)


@dataclass(frozen=True)
class Segment:
    """One logical block of a (possibly fused) parameter.

    ``dim`` is the axis the block is cut along (``None``: the whole tensor, and then
    ``start=0, stop=numel``). The block is positions ``[start, stop)`` along ``dim``, or the
    explicit positions ``index`` when they are not contiguous (GPT-NeoX interleaving).
    When the block belongs to attention heads, ``head_axis`` is the axis along which heads are
    laid out: an element's head is ``local // head_dim`` where ``local`` is its position along
    ``head_axis`` counted inside the block (its rank in ``index``, its offset from ``start``,
    or its plain position when ``head_axis != dim``).
    """

    component: str
    dim: int | None = None
    start: int = 0
    stop: int = 0
    index: tuple[int, ...] | None = None
    n_heads: int | None = None
    head_dim: int | None = None
    head_axis: int | None = None

    def length(self, shape: Sequence[int]) -> int:
        """Number of positions along ``dim`` (the whole element count when ``dim`` is None)."""
        if self.dim is None:
            return _prod(shape)
        if self.index is not None:
            return len(self.index)
        return self.stop - self.start

    def numel(self, shape: Sequence[int]) -> int:
        """Number of elements of the parameter in this block."""
        if self.dim is None:
            return _prod(shape)
        return _prod(shape) // shape[self.dim] * self.length(shape)


@dataclass(frozen=True)
class ParamInfo:
    """Where one parameter sits: its layer (None outside the layer stack) and its blocks."""

    name: str
    shape: tuple[int, ...]
    numel: int
    layer: int | None
    segments: tuple[Segment, ...]
    tied_to: str | None = None

    @property
    def components(self) -> tuple[str, ...]:
        """Distinct components of the parameter, in segment order."""
        seen: list[str] = []
        for seg in self.segments:
            if seg.component not in seen:
                seen.append(seg.component)
        return tuple(seen)


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _block(tensor: torch.Tensor, seg: Segment) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return (view of the block, or None) and (index tensor, or None) for scatter writes."""
    if seg.dim is None:
        return tensor, None
    if seg.index is not None:
        return None, torch.tensor(seg.index, dtype=torch.long)
    return tensor.narrow(seg.dim, seg.start, seg.stop - seg.start), None


def _axis_profile(info: ParamInfo) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(axis, component id per position, head id per position) when every block of the
    parameter is cut along, and has its heads along, one and the same axis; else None.

    Then the per-element tensors are these vectors broadcast over the other axes, which is
    far cheaper than writing each block of a large fused tensor separately.
    """
    shape = info.shape
    axes = {a for seg in info.segments for a in (seg.dim, seg.head_axis) if a is not None}
    if not shape or len(axes) > 1:
        return None
    axis = axes.pop() if axes else 0
    size = shape[axis]
    comp = torch.empty(size, dtype=torch.int8)
    heads = torch.full((size,), -1, dtype=torch.int32)
    for seg in info.segments:
        if seg.dim is None:
            positions: slice | torch.Tensor = slice(0, size)
            n_local = size
        elif seg.index is not None:
            positions = torch.tensor(seg.index, dtype=torch.long)
            n_local = len(seg.index)
        else:
            positions = slice(seg.start, seg.stop)
            n_local = seg.stop - seg.start
        comp[positions] = COMPONENT_INDEX[seg.component]
        if seg.n_heads is not None and seg.head_dim is not None and seg.head_axis is not None:
            heads[positions] = torch.arange(n_local, dtype=torch.int32) // seg.head_dim
    return axis, comp, heads


def _expand_along(vector: torch.Tensor, axis: int, shape: tuple[int, ...]) -> torch.Tensor:
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    return vector.view(bshape).expand(shape).contiguous()


def _fill_segment(tensor: torch.Tensor, seg: Segment, value: int | bool) -> None:
    view, index = _block(tensor, seg)
    if view is not None:
        view.fill_(value)
    else:
        assert seg.dim is not None and index is not None
        tensor.index_fill_(seg.dim, index, value)


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


# ---------------------------------------------------------------------------------------
# Building the map
# ---------------------------------------------------------------------------------------

_LAYER_CONTAINERS = r"(?:h|layers|layer|blocks|block|decoder_layers|transformer_blocks)"
_LAYER_RE = re.compile(rf"(?:^|\.){_LAYER_CONTAINERS}\.(\d+)(?:\.|$)")
_ANY_INDEX_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def parse_layer_index(name: str) -> int | None:
    """Layer index of a parameter name, e.g. ``model.layers.12.mlp...`` -> 12.

    Prefers the number after a known layer-container name (``h``, ``layers``, ``blocks``, ...);
    otherwise takes the first purely numeric name component; None outside the layer stack.
    """
    match = _LAYER_RE.search(name)
    if match is None:
        match = _ANY_INDEX_RE.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class _Dims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int | None


def _config_dims(model: nn.Module) -> _Dims | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names: str) -> Any:
        for attr in names:
            value = getattr(config, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    n_layers = first("num_hidden_layers", "n_layer", "num_layers")
    n_heads = first("num_attention_heads", "n_head", "num_heads")
    hidden = first("hidden_size", "n_embd", "d_model")
    if n_layers is None or n_heads is None or hidden is None:
        return None
    n_kv = first("num_key_value_heads", "n_head_kv", "num_kv_heads")
    if n_kv is None:
        n_kv = 1 if getattr(config, "multi_query", False) else n_heads
    head_dim = first("head_dim", "head_size") or hidden // n_heads
    inter = first("intermediate_size", "ffn_dim", "n_inner")
    return _Dims(n_layers, n_heads, n_kv, head_dim, hidden, inter)


class _MapError(Exception):
    """Internal: a layout rule does not fit the tensor it matched."""


# A fused layout turns (parameter shape, dims) into the segments of one parameter.
Layout = Callable[[tuple[int, ...], _Dims], tuple[Segment, ...]]


def _gpt2_c_attn(shape: tuple[int, ...], dims: _Dims) -> tuple[Segment, ...]:
    # Conv1D weight [in, 3*d] or bias [3*d]: [Q|K|V] along the last axis, heads inside each.
    axis = len(shape) - 1
    d = dims.n_heads * dims.head_dim
    if shape[axis] != 3 * d:
        raise _MapError(f"expected last axis 3*{d}, got shape {shape}")
    return tuple(
        Segment(comp, axis, i * d, (i + 1) * d, None, dims.n_heads, dims.head_dim, axis)
        for i, comp in enumerate(("attn_q", "attn_k", "attn_v"))
    )


@lru_cache(maxsize=64)
def _neox_index(n_heads: int, head_dim: int, part: int) -> tuple[int, ...]:
    # Rows of head h, part p (0=q, 1=k, 2=v): h*3*hd + p*hd + [0, hd). Cached so that every
    # layer's weight and bias share one tuple.
    rows = torch.arange(n_heads).unsqueeze(1) * 3 * head_dim + part * head_dim
    return tuple((rows + torch.arange(head_dim)).reshape(-1).tolist())


def _neox_qkv(shape: tuple[int, ...], dims: _Dims) -> tuple[Segment, ...]:
    # modeling_gpt_neox: qkv.view(..., n_heads, 3*head_dim).chunk(3, dim=-1)
    d = dims.n_heads * dims.head_dim
    if shape[0] != 3 * d:
        raise _MapError(f"expected first axis 3*{d}, got shape {shape}")
    segments = []
    for part, comp in enumerate(("attn_q", "attn_k", "attn_v")):
        rows = _neox_index(dims.n_heads, dims.head_dim, part)
        # start/stop give the bounding range; the rows themselves are `index`
        segments.append(
            Segment(
                comp,
                dim=0,
                start=rows[0],
                stop=rows[-1] + 1,
                index=rows,
                n_heads=dims.n_heads,
                head_dim=dims.head_dim,
                head_axis=0,
            )
        )
    return tuple(segments)


def _phi3_qkv(shape: tuple[int, ...], dims: _Dims) -> tuple[Segment, ...]:
    # modeling_phi3: q = qkv[..., :nq*hd], k = next nkv*hd, v = the rest.
    q = dims.n_heads * dims.head_dim
    kv = dims.n_kv_heads * dims.head_dim
    if shape[0] != q + 2 * kv:
        raise _MapError(f"expected first axis {q}+2*{kv}, got shape {shape}")
    return (
        Segment("attn_q", 0, 0, q, None, dims.n_heads, dims.head_dim, 0),
        Segment("attn_k", 0, q, q + kv, None, dims.n_kv_heads, dims.head_dim, 0),
        Segment("attn_v", 0, q + kv, q + 2 * kv, None, dims.n_kv_heads, dims.head_dim, 0),
    )


def _phi3_gate_up(shape: tuple[int, ...], dims: _Dims) -> tuple[Segment, ...]:
    # modeling_phi3: gate, up = gate_up_proj(x).chunk(2, dim=-1)
    if shape[0] % 2:
        raise _MapError(f"expected an even first axis, got shape {shape}")
    half = shape[0] // 2
    return (Segment("mlp_gate", 0, 0, half), Segment("mlp_up", 0, half, shape[0]))


@dataclass(frozen=True)
class _Rule:
    """How parameters whose name matches ``pattern`` are mapped (first matching rule wins).

    Either ``fused`` (a layout of several components, applied only for supported families)
    or one ``component`` for the whole tensor, with heads along its input features
    (``heads="in"``), its output features (``heads="out"``) or none.
    """

    pattern: re.Pattern[str]
    component: str = "other"
    heads: str | None = None  # "in" | "out" | None
    kv: bool = False  # heads are key/value heads
    fused: Layout | None = None


def _rule(
    pattern: str,
    component: str = "other",
    heads: str | None = None,
    kv: bool = False,
    fused: Layout | None = None,
) -> _Rule:
    return _Rule(re.compile(pattern), component, heads, kv, fused)


_W = r"\.(weight|bias)$"
_RULES: tuple[_Rule, ...] = (
    # fused attention / MLP layouts of the supported families
    _rule(r"\.attn\.c_attn" + _W, fused=_gpt2_c_attn),
    _rule(r"\.(self_)?attention\.query_key_value" + _W, fused=_neox_qkv),
    _rule(r"\.self_attn\.qkv_proj" + _W, fused=_phi3_qkv),
    _rule(r"\.mlp\.gate_up_proj" + _W, fused=_phi3_gate_up),
    # attention output projections: heads along the input features; bias after the head sum
    _rule(r"\.(o_proj|out_proj|attn\.c_proj|(self_)?attention\.dense)\.weight$", "attn_o", "in"),
    _rule(r"\.(o_proj|out_proj|attn\.c_proj|(self_)?attention\.dense)\.bias$", "attn_o"),
    # separate q/k/v projections: heads along the output features (bias included)
    _rule(r"\.(q_proj|query|q_lin|wq)" + _W, "attn_q", "out"),
    _rule(r"\.(k_proj|key|k_lin|wk)" + _W, "attn_k", "out", kv=True),
    _rule(r"\.(v_proj|value|v_lin|wv)" + _W, "attn_v", "out", kv=True),
    # MLPs
    _rule(r"\.(gate_proj|w1)" + _W, "mlp_gate"),
    _rule(r"\.(up_proj|fc1|c_fc|dense_h_to_4h|w3|fc_in)" + _W, "mlp_up"),
    _rule(r"\.(down_proj|fc2|mlp\.c_proj|dense_4h_to_h|w2|fc_out)" + _W, "mlp_down"),
    # embeddings and output head
    _rule(r"(^|\.)(wpe|embed_positions|position_embeddings)\.weight$", "pos_embed"),
    _rule(r"(^|\.)(wte|embed_tokens|embed_in|word_embeddings|tok_embeddings)\.weight$", "embed"),
    _rule(r"(^|\.)(lm_head|embed_out)" + _W, "lm_head"),
    # norms (Qwen3's q_norm/k_norm included: one vector shared by all heads)
    _rule(r"(^|\.)(\w*norm\w*|ln_\w+|ln\d*)" + _W, "norm"),
)


def _module_kind(model: nn.Module, name: str) -> str:
    """'linear' ([out, in]), 'conv1d' ([in, out]) or 'other' for the module owning ``name``."""
    module_name = name.rpartition(".")[0]
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return "other"
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D (GPT-2 family)
        return "conv1d"
    return "other"


def _head_axis(heads: str, shape: tuple[int, ...], kind: str) -> int | None:
    """Axis holding the heads, or None when the module's orientation is unknown."""
    if len(shape) == 1:
        return 0 if heads == "out" else None  # a bias lives on the output features
    if len(shape) != 2:
        return None
    out_axis = {"linear": 0, "conv1d": 1}.get(kind)
    if out_axis is None:
        return None
    return out_axis if heads == "out" else 1 - out_axis


def _segments_for(
    model: nn.Module,
    name: str,
    shape: tuple[int, ...],
    dims: _Dims | None,
    strict: bool,
    notes: list[str],
) -> tuple[Segment, ...]:
    """Segments of one parameter. ``strict`` (supported family): a misfit is an error.

    Not strict (fallback): fused tensors are never guessed (mapped to ``other``) and a tensor
    whose shape does not show the expected heads keeps its component without heads.
    """
    numel = _prod(shape)
    for rule in _RULES:
        if not rule.pattern.search(name):
            continue
        if rule.fused is not None:
            if not strict:
                notes.append(f"{name}: fused tensor of unknown layout mapped to 'other'")
                return (Segment("other", None, 0, numel),)
            assert dims is not None
            try:
                return rule.fused(shape, dims)
            except _MapError as exc:
                raise UnsupportedArchitecture(
                    f"parameter {name} does not fit its family's fused layout ({exc}); "
                    "this model variant is not supported"
                ) from None
        if rule.heads is None:
            return (Segment(rule.component, None, 0, numel),)
        axis = _head_axis(rule.heads, shape, _module_kind(model, name))
        n_heads = None if dims is None else (dims.n_kv_heads if rule.kv else dims.n_heads)
        if (
            axis is not None
            and dims is not None
            and n_heads is not None
            and shape[axis] == n_heads * dims.head_dim
        ):
            return (Segment(rule.component, None, 0, numel, None, n_heads, dims.head_dim, axis),)
        if strict:
            raise UnsupportedArchitecture(
                f"parameter {name} of shape {shape} does not show {n_heads} heads of "
                f"{None if dims is None else dims.head_dim} along its "
                f"{rule.heads}put features; this model variant is not supported"
            )
        notes.append(f"{name}: mapped to {rule.component!r} without head structure")
        return (Segment(rule.component, None, 0, numel),)
    notes.append(f"{name}: no rule matches this name; mapped to 'other'")
    return (Segment("other", None, 0, numel),)


def build_architecture_map(model: nn.Module) -> ArchitectureMap:
    """Map every parameter of ``model`` to (layer, component, heads).

    Supported families (``config.model_type``): gpt2, gpt_neox, opt, llama, mistral, qwen2,
    qwen3, phi3, gemma, gemma2. Others get the name-pattern fallback (``is_fallback=True``).
    Raises :class:`~cwa.errors.UnsupportedArchitecture` when the model has no parameters, or
    when a supported family's tensor does not have the shape its layout requires.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedArchitecture(
            f"expected a torch.nn.Module, got {type(model).__name__}; load the model first"
        )
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "") or "")
    family = SUPPORTED_FAMILIES.get(model_type)
    is_fallback = family is None
    dims = _config_dims(model)
    if family is not None and dims is None:
        raise UnsupportedArchitecture(
            f"{model_type} config lacks layer/head sizes; cannot map its heads; "
            "check that config.json is complete"
        )

    # Tied tensors: named_parameters() keeps the first name; the others are aliases.
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        if key in first_name:
            tied[name] = first_name[key]
        else:
            first_name[key] = name
    tied_to: dict[str, str] = {}
    for alias, stored in tied.items():
        tied_to.setdefault(stored, alias)

    notes: list[str] = []
    if is_fallback:
        notes.append(
            f"model_type {model_type or type(model).__name__!r} is not a supported family; "
            "components come from parameter-name patterns"
        )
    params: dict[str, ParamInfo] = {}
    layers_seen: set[int] = set()
    for name, param in model.named_parameters():
        shape = tuple(int(s) for s in param.shape)
        numel = _prod(shape)
        layer = parse_layer_index(name)
        if layer is not None:
            layers_seen.add(layer)
        segments = _segments_for(model, name, shape, dims, not is_fallback, notes)
        if sum(seg.numel(shape) for seg in segments) != numel:
            raise UnsupportedArchitecture(
                f"internal map error: segments of {name} do not cover its {numel} elements; "
                "please report this model"
            )
        params[name] = ParamInfo(name, shape, numel, layer, segments, tied_to.get(name))
    if not params:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} has no parameters; nothing to analyse"
        )
    if dims is not None:
        n_layers = dims.n_layers
        if layers_seen and max(layers_seen) >= n_layers:
            notes.append(
                f"parameter names reach layer {max(layers_seen)} but config says {n_layers} "
                "layers; using the names"
            )
            n_layers = max(layers_seen) + 1
        n_heads, n_kv, head_dim, hidden = (
            dims.n_heads,
            dims.n_kv_heads,
            dims.head_dim,
            dims.hidden_size,
        )
    else:
        n_layers = max(layers_seen) + 1 if layers_seen else 0
        n_heads = n_kv = head_dim = hidden = 0
        notes.append("config has no head sizes; no head structure mapped")
    # One note per kind of tensor, not per layer: "h.0.x" and "h.1.x" read as "h.*.x".
    notes = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", note) for note in notes))
    return ArchitectureMap(
        family=family or (model_type or type(model).__name__),
        is_fallback=is_fallback,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_size=hidden,
        params=params,
        tied=tied,
        notes=notes,
    )


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
