"""Prefixes of a pruning-scale ranking: the first k' <= k weights of a stored top-k selection.

``cwa rank --topk N%`` stores its selection (:mod:`cwa.ranking_store`) as an unordered set per
tensor (ascending flat indices, or a bit mask): the rank order inside the set is not stored.
The order is the ranking's total order on (key code, tensor position, flat index): the key
code of :func:`cwa.ranking_store._order_bits` (better first), ties broken by the tensor's place
in the artifact (the score file's order) and then by lower flat index. The first k' weights of
the top-k in that order are exactly the top-k' of the whole score file, so a prefix is found
**exactly** by the same radix select as :func:`cwa.ranking_store.select_k`, run over the
selected weights only: their scores are gathered from the score file tensor by tensor (the
indices come from the artifact), two 65,536-bin histograms give the k'-th code and how many tie
with it, and a third pass keeps every better code plus the first tied ones in tensor order then
flat order. Memory: the histograms and one tensor's scores and selected indices at a time; the
result is O(k') int64 indices (the perturbation's own footprint).

``k`` fractions (``"10%"``) are fractions of the rank run's candidates (every scored weight in
its scope), the base the rank run used for its own ``--topk N%``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cwa.errors import InvalidInput
from cwa.parsing import parse_percent

_BINS = 1 << 16
_NAN_CODE = np.uint32(0xFFFFFFFF)


def check_k_text(value: int | str) -> int | str:
    """A ``--k-values`` item: a positive whole number, or a percentage in (0, 100] / ``all``.

    Checked before anything is opened; fractions are resolved later against the rank run.
    """
    if isinstance(value, bool):
        raise InvalidInput(f"k {value!r} is not a number; give e.g. 1000 or 10%")
    if isinstance(value, int):
        if value < 1:
            raise InvalidInput(f"--k-values must be at least 1, got {value}")
        return value
    text = str(value).strip().lower()
    if text.isdigit():
        return check_k_text(int(text))
    if text == "all":
        return text
    if text.endswith("%"):
        parse_percent(text)
        return text
    raise InvalidInput(f"k {value!r} is not a number; give e.g. 1000, 10% or all")


def parse_k_values(text: str | None) -> list[int | str] | None:
    """``'10%,30%,1000'`` -> ``['10%', '30%', 1000]`` (each item checked)."""
    if text is None or not text.strip():
        return None
    return [check_k_text(part) for part in text.split(",") if part.strip()]


def is_fraction(value: int | str) -> bool:
    return isinstance(value, str)


class CompactRanking:
    """A rank run's compact top-k, read lazily; :meth:`prefix` gives its first k' weights.

    Stands in for the ``ranked_weights`` frame in a perturbation sweep (``height`` = k).
    """

    def __init__(self, selection_path: str | Path, score_path: str | Path) -> None:
        self.selection_path = Path(selection_path)
        self.score_path = Path(score_path)
        header_path = Path(f"{self.selection_path}.json")
        if not header_path.is_file() or not self.selection_path.is_file():
            raise InvalidInput(
                f"selection artifact {self.selection_path} is missing; re-run cwa rank --topk N%"
            )
        self.header: dict[str, Any] = json.loads(header_path.read_text())
        self.height = int(self.header["k"])
        self.by = str(self.header["by"])
        self.bottom = bool(self.header["bottom"])
        # Comparison group of the fraction (cwa rank --per); per-group k-values map to totals.
        self.per = str(self.header.get("per", "global"))
        self._fractions: dict[int, Any] = {}
        if self.per != "global":
            from fractions import Fraction

            self._fractions[self.height] = Fraction(self.header["percent"])

    @property
    def control_mode(self) -> str | None:
        """Group mode the matched controls use: per tensor for a per-tensor or per-row ranking
        (``random_k`` is matched row by row on top, see :attr:`row_layout`)."""
        return None if self.per == "global" else "tensor"

    @property
    def row_layout(self) -> dict[str, tuple[list[int], int]] | None:
        """Tensor name -> (shape, output axis) of a ``--per row`` ranking (None otherwise)."""
        if self.per != "row":
            return None
        return {e["name"]: (e["shape"], int(e["row_axis"])) for e in self.header["tensors"]}

    def resolve_k_values(
        self, values: Sequence[int | str] | None, *, n_candidates: int, rank_id: str
    ) -> list[int]:
        """k-values as sorted whole k (totals over the groups for a per-group ranking)."""
        if self.per == "global":
            return resolve_k_values(
                values, n_candidates=n_candidates, stored_k=self.height, rank_id=rank_id
            )
        from cwa.ranking_groups import percent_of, total_k

        stored = self._fractions[self.height]
        totals: set[int] = set()
        for value in values or []:
            if not isinstance(value, str):
                raise InvalidInput(
                    f"rank run {rank_id} selects {float(stored):g}% of each {self.per} (--per "
                    f"{self.per}): give --k-values as fractions (e.g. 10%,30%), not {value}"
                )
            percent = percent_of(value)
            if percent > stored:
                raise InvalidInput(
                    f"k = {value} is more than rank run {rank_id} selected ({float(stored):g}% "
                    f"per {self.per}); lower k or re-rank with a larger --topk"
                )
            total = total_k(self.header["group_sizes"], percent)
            if total == 0:
                raise InvalidInput(
                    f"k = {value} per {self.per} selects no weight; raise the fraction"
                )
            self._fractions.setdefault(total, percent)  # equal totals: the first fraction
            totals.add(total)
        return sorted(totals) if totals else [self.height]

    def names(self) -> list[str]:
        return [entry["name"] for entry in self.header["tensors"] if entry["count"]]

    def prefix(self, k: int) -> dict[str, np.ndarray]:
        """Tensor name -> ascending int64 flat indices of the first ``k`` ranked weights (per
        group for a ``--per tensor|row`` ranking: ``k`` is a total from resolve_k_values)."""
        if self.per == "global":
            return dict(prefix_selection(self.selection_path, self.score_path, k))
        from cwa.ranking_groups import prefix_grouped
        from cwa.ranking_store import iter_selection

        if k == self.height:
            return {n: i for n, i in iter_selection(self.selection_path) if i.size}
        if k not in self._fractions:
            raise InvalidInput(f"k = {k} is not a resolved fraction of this per-group ranking")
        return dict(prefix_grouped(self.selection_path, self.score_path, self._fractions[k]))


def _selected_codes(
    selection_path: Path, score_path: Path, by: str, bottom: bool
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, ascending selected flat indices, their key codes), tensor by tensor."""
    from cwa.ranking_store import _order_bits, iter_selection
    from cwa.scorefile import open_scores

    with open_scores(score_path) as reader:
        for name, indices in iter_selection(selection_path):
            if indices.size == 0:
                continue
            scores = reader.get(name).float().numpy().reshape(-1)
            yield name, indices, _order_bits(scores[indices], by, bottom)
            del scores


def prefix_selection(
    selection_path: str | Path, score_path: str | Path, k: int
) -> Iterator[tuple[str, np.ndarray]]:
    """(tensor name, ascending int64 flat indices) of the first ``k`` weights of a stored
    selection in rank order (see the module docstring); tensors with none are skipped."""
    selection_path, score_path = Path(selection_path), Path(score_path)
    header = json.loads(Path(f"{selection_path}.json").read_text())
    by, bottom, stored_k = str(header["by"]), bool(header["bottom"]), int(header["k"])
    k = int(k)
    if not 1 <= k <= stored_k:
        raise InvalidInput(
            f"k = {k} is outside the stored ranking's 1..{stored_k}; lower k or re-rank with a "
            "larger --topk"
        )

    def codes() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        return _selected_codes(selection_path, score_path, by, bottom)

    if k == stored_k:  # the whole stored set: no select needed
        for name, indices, _ in codes():
            yield name, indices.astype(np.int64, copy=False)
        return
    hist_hi = np.zeros(_BINS, dtype=np.int64)
    for _, _, code in codes():
        hist_hi += np.bincount(code >> 16, minlength=_BINS)
    cum = np.cumsum(hist_hi)
    hi = int(np.searchsorted(cum, k))
    below = int(cum[hi - 1]) if hi else 0
    hist_lo = np.zeros(_BINS, dtype=np.int64)
    for _, _, code in codes():
        hist_lo += np.bincount(code[(code >> 16) == hi] & np.uint32(0xFFFF), minlength=_BINS)
    cum_lo = below + np.cumsum(hist_lo)
    lo = int(np.searchsorted(cum_lo, k))
    threshold = np.uint32((hi << 16) | lo)
    ties_left = k - (int(cum_lo[lo - 1]) if lo else below)
    for name, indices, code in codes():
        keep = code < threshold
        if ties_left > 0:  # tensors in ranking order, indices ascending: first ties win
            tied = np.flatnonzero(code == threshold)[:ties_left]
            keep[tied] = True
            ties_left -= int(tied.size)
        chosen = indices[keep].astype(np.int64, copy=False)
        if chosen.size:
            yield name, chosen


def resolve_k_values(
    values: Sequence[int | str] | None, *, n_candidates: int, stored_k: int, rank_id: str
) -> list[int]:
    """k-values (numbers or fractions of ``n_candidates``) as sorted whole k <= ``stored_k``."""
    from cwa.ranking_store import parse_k

    if not values:
        return [stored_k]
    out = set()
    for value in values:
        k = parse_k(value, n_candidates)
        if k > stored_k:
            raise InvalidInput(
                f"k = {value} ({k} weights) is more than rank run {rank_id} selected ({stored_k});"
                f" lower k or re-rank with a larger --topk"
            )
        out.add(k)
    return sorted(out)


def selection_artifact(store: Any, rank_run: Any) -> Path | None:
    """The rank run's compact selection file, when it stored one (``--topk N%``)."""
    info = rank_run.config.get("selection")
    if not info:
        return None
    return Path(store.artifacts_dir(rank_run.run_id)) / str(info["artifact"])
