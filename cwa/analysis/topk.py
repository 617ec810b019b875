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
    """A RunningTopK plus, per held entry, its global id and the other runs' scores.

    ``offsets[position]`` is the first global element id of the parameter at ``position``
    (architecture order), so an entry's global id is ``offsets[position] + flat``.
    """

    def __init__(self, k: int, n_other: int, offsets: np.ndarray) -> None:
        from cwa.ranking import RunningTopK

        self.top = RunningTopK(k)
        self.offsets = offsets
        self.gids = np.empty(0, dtype=np.int64)
        self.payload = np.empty((0, n_other), dtype=np.float32)

    def offer(
        self,
        position: int,
        keys: np.ndarray,
        flats: np.ndarray | None,
        others: Sequence[np.ndarray],
    ) -> None:
        """Offer one tensor's candidates (``flats`` ascending; None = every element).

        ``others`` are the other runs' whole flat score arrays of the same tensor.
        """
        top = self.top
        top.offer(position, keys, flats)
        new = top.positions == position
        if not new.any():
            return  # nothing entered, so nothing left either
        gids = self.offsets[top.positions] + top.flats
        payload = np.empty((gids.size, self.payload.shape[1]), dtype=np.float32)
        old = ~new
        if old.any():
            order = np.argsort(self.gids, kind="stable")
            where = order[np.searchsorted(self.gids, gids[old], sorter=order)]
            payload[old] = self.payload[where]
        new_flats = top.flats[new]
        for j, other in enumerate(others):
            payload[new, j] = other[new_flats]
        self.gids, self.payload = gids, payload

    def head(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(global ids, scores, other runs' scores) of the best ``k`` entries, best first."""
        return self.gids[:k], self.top.keys[:k], self.payload[:k]
