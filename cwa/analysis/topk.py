"""Streaming top-k of several score runs at once, per group, with the other runs' scores.

The score files of R runs of one model are read in lockstep, one tensor of each run at a time.
For every run and group (global, each layer, each component) a
:class:`cwa.ranking.RunningTopK` keeps the exact top-K (the same order and tie rule as
``cwa rank``: higher score first, then parameter order, then flat index; NaN never ranked).
Next to the held entries the tracker keeps the *other* runs' scores of the same weights, read
from their tensors while those are in memory, so rank correlations on the union of two top-k
sets need no second pass over any file. Memory: R tensors plus O(K * R) per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TrackedTopK:
    """Exact running top-k (the order and tie rule of :class:`cwa.ranking.RunningTopK`) whose
    entries carry the other runs' scores of the same weights.

    ``offsets[position]`` is the first global element id of the parameter at ``position``
    (architecture order), so an entry's global id is ``offsets[position] + flat``. The
    candidate pre-filter and tie-boundary selection are :class:`~cwa.ranking.RunningTopK`'s
    (``_top_indices``); the payload rides along every index operation, so no lookups are needed.
    """

    def __init__(self, k: int, n_other: int, offsets: np.ndarray) -> None:
        self.k = k
        self.offsets = offsets
        self.keys = np.empty(0, dtype=np.float32)
        self.positions = np.empty(0, dtype=np.int64)
        self.flats = np.empty(0, dtype=np.int64)
        self.payload = np.empty((0, n_other), dtype=np.float32)

    def offer(
        self,
        position: int,
        keys: np.ndarray,
        flats: np.ndarray | None,
        others: Sequence[np.ndarray],
    ) -> None:
        """Offer one tensor's candidates (``flats`` ascending; None = every element).

        Positions must not decrease between calls; ``others`` are the other runs' whole flat
        score arrays of the same tensor.
        """
        from cwa.ranking import _top_indices

        if keys.size == 0:
            return
        local: np.ndarray | None = None
        if self.keys.size >= self.k:
            # equal keys lose to held entries (earlier position): strictly greater only
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
        order = np.argsort(-keys, kind="stable")  # ascending flats among equal keys
        new_flats = new_flats[order].astype(np.int64)
        payload = np.empty((order.size, self.payload.shape[1]), dtype=np.float32)
        for j, other in enumerate(others):
            payload[:, j] = other[new_flats]
        merged_keys = np.concatenate([self.keys, keys[order]])
        best = np.argsort(-merged_keys, kind="stable")[: self.k]  # held entries first on ties
        self.keys = merged_keys[best]
        self.positions = np.concatenate(
            [self.positions, np.full(order.size, position, dtype=np.int64)]
        )[best]
        self.flats = np.concatenate([self.flats, new_flats])[best]
        self.payload = np.concatenate([self.payload, payload])[best]

    def head(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(global ids, scores, other runs' scores) of the best ``k`` entries, best first."""
        gids = self.offsets[self.positions[:k]] + self.flats[:k]
        return gids, self.keys[:k], self.payload[:k]
