"""The vocabulary of the architecture map: components, and the blocks a parameter is cut into.

:data:`COMPONENTS` names what a weight can be; :class:`Segment` is one logical block of a
(possibly fused) parameter and :class:`ParamInfo` a parameter's layer and blocks. The helpers
turn blocks into per-element tensors (component ids, head ids, masks) without Python loops over
elements. :class:`~cwa.models.architecture.ArchitectureMap` is built from these.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from cwa.errors import UnknownComponent

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
