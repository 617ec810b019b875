"""profile's per-tensor binning: one pass over a score tensor for every (component, head) group.

Each element of a parameter belongs to one *fine group*: its component block (fused tensors
such as GPT-2 ``c_attn`` hold q, k and v) and, inside attention blocks, its head (or no head).
The tensor is binned once into ``(fine group, log bin)`` cells (:mod:`cwa.analysis.histogram`'s
keys: the float32 bit pattern shifted right, no logarithm) with ``torch.bincount``: exact
counts; each group's exact |score| sum, min and max come from float64 reductions. Per-bin
masses (used only for Gini and the top-1% share) are count x bin midpoint, within half a bin
(0.39%) of each value; a weighted bincount for exact bin masses cost as much as the rest of
the pass together. Whole-tensor, component and head histograms are then sums of rows of that
table, so no group is binned twice.

When the architecture map cuts the parameter along one axis (every adapter's layout so far),
the fine group of an element depends only on its position along that axis: the group id is a
short vector, each group is a slice (or gather) along that axis counted on its own (its few
thousand bins stay in L1), and per-group sums/min/max come from reductions over the other
axes. Work is done in blocks of about ``CHUNK`` elements so that temporaries stay in cache.
Tensors holding NaN or inf (out-of-scope markers) and parameters without a one-axis layout
take a masked, per-element path that gives the same bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cwa.analysis.histogram import INF_KEY, SHIFT, key_edges

CHUNK = 1 << 18  # elements per block (1 MiB of float32): temporaries stay in L2


@dataclass
class TensorBins:
    """Bins of one tensor per fine group: keys [lo, lo + span) of every row."""

    lo: int
    counts: np.ndarray  # int64 [G, span]
    mass: np.ndarray  # float64 [G, span]: count x bin midpoint (for Gini / top-1% share)
    exact: np.ndarray  # float64 [G]: exact sum of the group's |scores|
    vmin: np.ndarray  # float64 [G] (inf where empty)
    vmax: np.ndarray  # float64 [G] (-inf where empty)
    comps: tuple[str, ...]
    n_heads: int  # H: fine group g = comp_index * (H + 1) + head + 1 (head -1 = none)

    def rows(self, comp: int, head: int | None = None) -> slice:
        """Rows of one component (all its heads), or of one of its heads."""
        base = comp * (self.n_heads + 1)
        if head is None:
            return slice(base, base + self.n_heads + 1)
        return slice(base + head + 1, base + head + 2)


def _fine_ids(arch: Any, name: str) -> tuple[int | None, Any, int, int]:
    """(axis, fine group per position along axis | per element, n_groups, n_heads)."""
    import torch

    from cwa.models.segments import COMPONENT_INDEX, _axis_profile

    info = arch.params[name]
    comps = info.components
    n_heads = max((seg.n_heads or 0) for seg in info.segments) if info.layer is not None else 0
    n_groups = len(comps) * (n_heads + 1)
    lookup = torch.full((len(COMPONENT_INDEX),), -1, dtype=torch.int32)
    lookup[[COMPONENT_INDEX[c] for c in comps]] = torch.arange(len(comps), dtype=torch.int32)
    profile = _axis_profile(info)
    if profile is not None:
        axis, comp_vec, head_vec = profile
        if not n_heads:
            head_vec = torch.full_like(head_vec, -1)
        fine = lookup[comp_vec.long()] * (n_heads + 1) + head_vec + 1
        return axis, fine, n_groups, n_heads
    comp_ids = arch.component_ids(name).reshape(-1).long()
    heads = arch.head_ids(name).reshape(-1) if n_heads else torch.full_like(comp_ids, -1)
    return None, (lookup[comp_ids] * (n_heads + 1) + heads + 1).int(), n_groups, n_heads


def _key(value: float) -> int:
    return int(np.array([value], dtype=np.float32).view(np.int32)[0] >> SHIFT)


def tensor_fine_bins(arch: Any, name: str, tensor: Any) -> TensorBins | None:
    """Bin one score tensor (any float dtype) per fine group; None when nothing is finite."""
    import torch

    info = arch.params[name]
    t = tensor if tensor.dtype == torch.float32 else tensor.float()
    t = t.reshape(info.shape) if info.shape else t.reshape(-1)
    axis, fine, n_groups, n_heads = _fine_ids(arch, name)
    if t.numel() == 0:
        return None
    low, high = torch.aminmax(t)
    low, high = float(low), float(high)
    if not (np.isfinite(low) and np.isfinite(high)):
        return _masked_bins(t, axis, fine, n_groups, n_heads, info.components)
    top = max(abs(low), abs(high))
    bottom = low if low >= 0 else (-high if high <= 0 else 0.0)
    lo, span = _key(bottom), _key(top) - _key(bottom) + 1
    counts = torch.zeros((n_groups, span), dtype=torch.int64)
    exact = torch.zeros(n_groups, dtype=torch.float64)
    vmin = torch.full((n_groups,), float("inf"), dtype=torch.float64)
    vmax = torch.full((n_groups,), float("-inf"), dtype=torch.float64)
    signed = low < 0
    if axis is None:  # no one-axis layout: per-element ids, one table (slower, rare)
        size = n_groups * span
        flat_counts = counts.view(-1)
        for values, offsets, gid in _flat_blocks(t.reshape(-1), fine, span, lo):
            mags = values.abs() if signed else values
            keys = (mags.view(torch.int32) >> SHIFT) + offsets
            flat_counts += torch.bincount(keys, minlength=size)
            exact.index_add_(0, gid.long(), mags.double())
            vmin.scatter_reduce_(0, gid.long(), mags.double(), "amin")
            vmax.scatter_reduce_(0, gid.long(), mags.double(), "amax")
    else:
        # one group at a time: its bins (a few thousand) stay in L1 while it is counted
        for g, part in _group_parts(t, axis, fine):
            for values in _chunks(part):
                mags = values.abs() if signed else values
                keys = mags.view(torch.int32) >> SHIFT
                keys -= lo
                counts[g] += torch.bincount(keys.reshape(-1), minlength=span)
                if n_groups == 1:
                    exact[0] += float(mags.sum(dtype=torch.float64))
                    if bottom == 0.0 and signed:  # mixed signs: the smallest |score| is unknown
                        vmin[0] = min(float(vmin[0]), float(mags.min()))
        if n_groups > 1:  # per position along the axis, then per group: three reductions
            _axis_extremes(t.abs() if signed else t, axis, fine.long(), exact, vmin, vmax)
    if n_groups == 1:
        vmin[0], vmax[0] = (vmin[0] if bottom == 0.0 and signed else bottom), top
    return _finish(lo, counts, exact, vmin, vmax, info.components, n_heads)


def _finish(lo: int, counts: Any, exact: Any, vmin: Any, vmax: Any, comps: tuple, n_heads: int):
    counts = counts.numpy()
    lower, upper = key_edges(np.arange(lo, lo + counts.shape[1]))
    mass = counts * ((lower + upper) / 2)[None, :]  # midpoints: within half a bin per value
    return TensorBins(lo, counts, mass, exact.numpy(), vmin.numpy(), vmax.numpy(), comps, n_heads)


def _axis_extremes(mags: Any, axis: int, gid: Any, exact: Any, vmin: Any, vmax: Any) -> None:
    """Exact sum, min and max of |scores| per fine group from reductions over the other axes."""
    import torch

    shape = mags.shape
    before = int(np.prod(shape[:axis])) if axis else 1
    after = int(np.prod(shape[axis + 1 :])) if axis + 1 < len(shape) else 1
    # numpy: torch's float64 sum over a non-innermost axis was ~10-20x slower here
    cube = mags.numpy().reshape(before, shape[axis], after)
    if after == 1:
        plane, dims = cube.reshape(before, shape[axis]), 0
    elif before == 1:
        plane, dims = cube.reshape(shape[axis], after), 1
    else:
        plane, dims = cube, (0, 2)
    sums = plane.sum(axis=dims, dtype=np.float64)
    exact.index_add_(0, gid, torch.from_numpy(sums))
    lows = torch.from_numpy(plane.min(axis=dims).astype(np.float64))
    highs = torch.from_numpy(plane.max(axis=dims).astype(np.float64))
    vmin.scatter_reduce_(0, gid, lows, "amin")
    vmax.scatter_reduce_(0, gid, highs, "amax")


def _group_parts(t: Any, axis: int, fine: Any):
    """(fine group, view of its elements as [before, positions, after]) per non-empty group:
    a slice when its positions along ``axis`` are contiguous, else a gathered copy."""
    import torch

    shape = t.shape
    before = int(np.prod(shape[:axis])) if axis else 1
    after = int(np.prod(shape[axis + 1 :])) if axis + 1 < len(shape) else 1
    cube = t.reshape(before, shape[axis], after)
    ids = fine.numpy()
    for g in np.unique(ids).tolist():
        positions = np.flatnonzero(ids == g)
        first, last = int(positions[0]), int(positions[-1]) + 1
        if last - first == positions.size:
            yield g, cube[:, first:last]
        else:
            yield g, cube.index_select(1, torch.from_numpy(positions))


def _chunks(part: Any):
    """Blocks of about CHUNK elements of a [before, positions, after] view."""
    before, positions, after = part.shape
    slab = positions * after
    if slab >= CHUNK or before == 1:
        step = max(1, CHUNK // max(after, 1))
        for a in range(before):
            for s in range(0, positions, step):
                yield part[a, s : s + step]
    else:
        step = max(1, CHUNK // max(slab, 1))
        for a in range(0, before, step):
            yield part[a : a + step]


def _flat_blocks(flat: Any, fine: Any, span: int, lo: int):
    offsets = (fine * span - lo).int()
    for start in range(0, flat.numel(), CHUNK):
        stop = start + CHUNK
        yield flat[start:stop], offsets[start:stop], fine[start:stop]


def _masked_bins(
    t: Any, axis: int | None, fine: Any, n_groups: int, n_heads: int, comps: tuple[str, ...]
) -> TensorBins | None:
    """Path for tensors with NaN/inf: per-element group ids, non-finite elements dropped."""
    import torch

    if axis is not None:
        shape = t.shape
        view = [1] * len(shape)
        view[axis] = shape[axis]
        fine = fine.view(view).expand(shape)
    mags = t.abs().reshape(-1)
    gid = fine.reshape(-1)
    keep = torch.isfinite(mags)
    mags, gid = mags[keep], gid[keep].long()
    if mags.numel() == 0:
        return None
    keys = mags.view(torch.int32) >> SHIFT
    lo = int(keys.min())
    span = int(keys.max()) - lo + 1
    assert lo + span <= INF_KEY
    combined = gid * span + (keys - lo)
    size = n_groups * span
    counts = torch.bincount(combined, minlength=size)
    exact = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, mags.double())
    vmin = torch.full((n_groups,), float("inf"), dtype=torch.float64)
    vmax = torch.full((n_groups,), float("-inf"), dtype=torch.float64)
    vmin.scatter_reduce_(0, gid, mags.double(), "amin")
    vmax.scatter_reduce_(0, gid, mags.double(), "amax")
    return _finish(lo, counts.view(n_groups, span), exact, vmin, vmax, comps, n_heads)
