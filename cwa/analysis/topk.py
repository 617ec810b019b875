"""Streaming top-k of several score runs at once, per group, with the other runs' scores.

The score files of R runs of one model are read in lockstep, one tensor of each run at a time.
For every run and group (global, each layer, each component) a :class:`TrackedTopK` keeps the
exact top-K (the order and tie rule of ``cwa rank``: higher score first, then parameter order,
then flat index; NaN never ranked). Next to the held entries it keeps the *other* runs' scores
of the same weights, read from their tensors while those are in memory, so rank correlations
on the union of two top-k sets need no second pass over any file. Memory: R tensors plus
O(K * R) per group.

Speed: a tensor (or a component block of a fused tensor) is looked at once per run by
:func:`block_candidates`: when its groups already hold K entries, one comparison against the
lowest held score (``> threshold``: an equal score loses to the earlier weights held); else the
K-th largest is bracketed from a strided sample, one comparison keeps the few values above the
bracket, and a partition of those picks the exact top-K (no sort or top-k of the whole tensor).
Entries are appended to a group's pool and the pool is cut back to K (and its threshold
raised) only between tensors, so the selection costs O(candidates), not O(K) per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class TrackedTopK:
    """Exact running top-k whose entries carry the other runs' scores of the same weights.

    ``offsets[position]`` is the first global element id of the parameter at ``position``
    (architecture order), so an entry's global id (``gid``) is ``offsets[position] + flat``
    and orders ties like ``cwa rank`` (parameter order, then flat index).
    """

    def __init__(self, k: int, n_other: int, offsets: np.ndarray) -> None:
        self.k = k
        self.offsets = offsets
        self.threshold: float | None = None  # the K-th best held score once K are held
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._size = 0
        self._n_other = n_other
        self._final: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def offer(
        self,
        position: int,
        keys: np.ndarray,
        flats: np.ndarray | None,
        others: Sequence[np.ndarray],
    ) -> None:
        """Offer one tensor's candidates (``flats`` ascending; None = every element);
        ``others`` are the other runs' whole flat score arrays of the same tensor."""
        from cwa.ranking import _top_indices

        local = np.arange(keys.size, dtype=np.int64)
        if self.threshold is not None:
            local = np.flatnonzero(keys > self.threshold)
        if local.size > self.k:
            local = local[_top_indices(keys[local], self.k)]
        flat = local if flats is None else np.asarray(flats)[local]
        payload = np.empty((flat.size, self._n_other), dtype=np.float32)
        for j, other in enumerate(others):
            payload[:, j] = other[flat]
        self.add(keys[local], self.offsets[position] + flat, payload)
        self.compact()

    def add(self, keys: np.ndarray, gids: np.ndarray, payload: np.ndarray) -> None:
        """Append entries of the current tensor (already above :attr:`threshold`)."""
        if keys.size:
            self._parts.append((keys.astype(np.float32, copy=False), gids, payload))
            self._size += keys.size
            self._final = None

    def compact(self, slack: int = 1) -> None:
        """Cut the pool back to the best K when it holds more than ``slack * K`` entries
        (call between tensors only: the raised threshold drops equal scores that come later)."""
        if self._size <= slack * self.k or not self._parts:
            return
        keys, gids, payload = (np.concatenate(a) for a in zip(*self._parts, strict=True))
        if keys.size > self.k:
            n = keys.size
            kth = np.partition(keys, n - self.k)[n - self.k]
            above = np.flatnonzero(keys > kth)
            ties = np.flatnonzero(keys == kth)
            ties = ties[np.argsort(gids[ties], kind="stable")[: self.k - above.size]]
            keep = np.concatenate([above, ties])
            keys, gids, payload = keys[keep], gids[keep], payload[keep]
        if keys.size >= self.k:
            self.threshold = float(keys.min())
        self._parts = [(keys, gids, payload)]
        self._size = keys.size

    def head(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(global ids, scores, other runs' scores) of the best ``k`` entries, best first."""
        if self._final is None:
            self.compact(slack=1)
            if self._parts:
                keys, gids, payload = (np.concatenate(a) for a in zip(*self._parts, strict=True))
                order = np.lexsort((gids, -keys.astype(np.float64)))
                self._final = (gids[order], keys[order], payload[order])
            else:
                empty = np.empty(0, dtype=np.int64)
                self._final = (
                    empty,
                    np.empty(0, dtype=np.float32),
                    np.empty((0, self._n_other), dtype=np.float32),
                )
        gids, keys, payload = self._final
        return gids[:k], keys[:k], payload[:k]


def block_candidates(
    flat: np.ndarray, k: int, threshold: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(ascending indices, scores) of a superset of the top-``k`` of a flat float32 array
    among the values above ``threshold`` (None: all non-NaN), cut to at most ``k`` by the
    exact tie rule (lowest index first). numpy: its compare + flatnonzero is ~3x torch's."""
    from cwa.ranking import _top_indices

    n = flat.size
    if threshold is not None:
        index = np.flatnonzero(flat > np.float32(threshold))
    elif n <= k:
        index = np.flatnonzero(~np.isnan(flat))
    else:
        index = None
        sample = flat[:: max(1, n // 65536)]
        sample = sample[~np.isnan(sample)]
        for factor in (2.0, 8.0):  # bracket the k-th largest from below, then check
            want = math.ceil(factor * k / n * sample.size) + 16
            if want >= sample.size:
                break
            bracket = np.partition(sample, sample.size - want)[sample.size - want]
            found = np.flatnonzero(flat > bracket)
            if found.size >= k:
                index = found
                break
        if index is None:
            index = np.flatnonzero(~np.isnan(flat))
    keys = flat[index]
    if keys.size > k:
        pick = _top_indices(keys, k)
        keys, index = keys[pick], index[pick]
    return index, keys


def as_float32(tensor: Any, shape: tuple[int, ...]) -> Any:
    import torch

    t = tensor if tensor.dtype == torch.float32 else tensor.float()
    return t.reshape(shape) if shape else t.reshape(-1)


def component_blocks(arch: Any, name: str) -> list[tuple[str, Any]]:
    """(component, how to cut its block out of the tensor) per component of a parameter."""
    from cwa.models.segments import COMPONENT_INDEX, _axis_profile

    info = arch.params[name]
    comps = info.components
    if len(comps) == 1:
        return [(comps[0], None)]
    profile = _axis_profile(info)
    if profile is not None:
        axis, comp_vec = profile[0], profile[1].numpy()
        return [(c, ("axis", axis, np.flatnonzero(comp_vec == COMPONENT_INDEX[c]))) for c in comps]
    comp_ids = arch.component_ids(name).reshape(-1).numpy()
    return [(c, ("flat", np.flatnonzero(comp_ids == COMPONENT_INDEX[c]))) for c in comps]


def block_values(tensor: Any, spec: Any) -> tuple[Any, Any]:
    """(flat block values, map from block-flat to tensor-flat indices; monotone)."""
    import torch

    if spec is None:
        return tensor.reshape(-1), lambda i: i
    if spec[0] == "flat":
        index = spec[1]
        return tensor.reshape(-1)[torch.from_numpy(index)], lambda i: index[i]
    _, axis, pos = spec
    shape = tensor.shape
    before = int(np.prod(shape[:axis])) if axis else 1
    size = shape[axis]
    after = int(np.prod(shape[axis + 1 :])) if axis + 1 < len(shape) else 1
    cube = tensor.reshape(before, size, after)
    first, last = int(pos[0]), int(pos[-1]) + 1
    if last - first == pos.size:
        block = cube[:, first:last]
    else:
        block = cube.index_select(1, torch.from_numpy(pos))
    width = pos.size * after

    def to_tensor(i: np.ndarray) -> np.ndarray:
        a, rest = np.divmod(i, width)
        s, b = np.divmod(rest, after)
        return (a * size + pos[s]) * after + b

    return block.reshape(-1), to_tensor


def offer_block(trackers: list, values: Any, to_tensor: Any, offset: int, others: list) -> None:
    """Candidates of one block for each of its groups' trackers (one scan in most cases)."""
    from cwa.ranking import _top_indices

    open_ = [t for t in trackers if t.threshold is None]
    full = [t for t in trackers if t.threshold is not None]
    shared: tuple[np.ndarray, np.ndarray] | None = None
    complete = False
    if open_:
        k = max(t.k for t in open_)
        shared = block_candidates(values, k, None)
        complete = shared[0].size < k  # every valid value of the block
    else:
        shared = block_candidates(values, max(t.k for t in full), min(t.threshold for t in full))
        complete = True  # every value above each tracker's threshold (cut to the largest k)
    for tracker in trackers:
        index, keys = shared
        threshold = tracker.threshold
        if threshold is not None:
            if not complete and open_ and keys.size and keys.min() > threshold:
                # the block has more values above this tracker's threshold than the shared
                # top-k holds: scan it for this tracker alone
                index, keys = block_candidates(values, tracker.k, threshold)
            keep = keys > threshold
            index, keys = index[keep], keys[keep]
        if keys.size > tracker.k:
            pick = _top_indices(keys, tracker.k)
            index, keys = index[pick], keys[pick]
        flat = to_tensor(index)
        payload = np.empty((flat.size, len(others)), dtype=np.float32)
        for j, other in enumerate(others):
            payload[:, j] = other[flat]
        tracker.add(keys, offset + flat, payload)
