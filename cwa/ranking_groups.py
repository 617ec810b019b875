"""Pruning-scale selections compared within groups: per tensor or per output row.

``cwa rank --topk N% --per global|tensor|row`` chooses the *comparison group* of a fraction:

- ``global`` (default, :func:`cwa.ranking_store.select_k`): the exact N% of every scored
  weight in scope, compared across all tensors;
- ``tensor``: N% of each tensor, compared inside the tensor (layer-wise magnitude pruning);
- ``row``: N% of each **output row** of a 2-D Linear or Conv1D weight, compared inside the row
  (Wanda, Sun et al. 2023: |W_ij|·‖X_j‖ compared per output neuron i). An output row is the
  weights feeding one output feature: a row of a Linear weight ``[out, in]``, a column of a
  GPT-2 Conv1D weight ``[in, out]`` (``row_axis`` 0 or 1, taken from the model's modules).
  Any other tensor (biases, norms, embeddings) has no output rows and is refused up front.

Count per group ``g`` with ``n_g`` scored (non-NaN) weights: ``k_g = floor(n_g·N/100 + 1/2)``
computed exactly in integers (round half up; ``all`` = 100%), so a group may get 0 at tiny
fractions; the total must be at least 1. Inside a group the order is the ranking key's code
(:func:`cwa.ranking_store._order_bits`, best first), ties to the lower flat index (= lower
input index in both layouts). ``bottom`` selects the least important the same way.

Vectorised, no loop over weights: per tensor the rows are processed in chunks of about
``SLICE`` elements; ``numpy.partition`` along the row axis gives each row's k-th code, then
every code below it plus the first tied ones by column are kept (a loop over the *distinct*
per-row counts, one unless rows hold NaN). ``tensor`` uses the radix select of
:mod:`cwa.ranking_store` over slices of the one tensor. Memory: temporaries of one chunk plus one
tensor's scores and its 1-byte mask; the artifact is the same compact format (indices or bit
mask per tensor) with ``per`` and each tensor's ``row_axis`` in its header.

Prefixes for ``perturb --k-values 10%,30%`` (:func:`prefix_grouped`) take the first
``floor(n_g·p/100 + 1/2)`` of each group's stored selection in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cwa.errors import InvalidInput
from cwa.parsing import parse_percent

if TYPE_CHECKING:
    from cwa.ranking_store import SelectionSummary

PER_CHOICES: tuple[str, ...] = ("global", "tensor", "row")
_NAN = np.uint32(0xFFFFFFFF)


def check_per(per: str, topk: Any) -> str:
    """``--per`` must be a known group, and tensor/row need a fraction ``--topk N%``."""
    if per not in PER_CHOICES:
        raise InvalidInput(f"--per {per!r}: use one of {', '.join(PER_CHOICES)}")
    if per != "global" and not (isinstance(topk, str) and topk.strip().endswith("%")):
        raise InvalidInput(
            f"--per {per} compares a fraction of each {per}: give --topk as N% (e.g. 50%), "
            "or use --mode for a number of weights per group"
        )
    return per


def percent_of(text: str | int) -> Fraction:
    """``"50%"`` -> 50 exactly (decimal text read as a fraction); ``"all"`` -> 100."""
    value = str(text).strip().lower()
    if value == "all":
        return Fraction(100)
    if not value.endswith("%"):
        raise InvalidInput(f"k {text!r}: a per-group selection takes a fraction such as 10%")
    return parse_percent(value)


def group_k(n_valid: np.ndarray | int, percent: Fraction) -> np.ndarray:
    """``floor(n·p/100 + 1/2)`` exactly, elementwise (int64)."""
    n = np.asarray(n_valid, dtype=np.int64)
    num, den = percent.numerator, percent.denominator * 100
    return (2 * n * num + den) // (2 * den)


def total_k(group_sizes: Sequence[Sequence[int]], percent: Fraction) -> int:
    """Weights a fraction selects over groups given as ``[[n_valid, n_groups], ...]``."""
    return sum(int(group_k(n, percent)) * int(count) for n, count in group_sizes)


def _module_axis(model: Any, name: str) -> int | None:
    import torch

    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    param = getattr(module, attr, None)
    if attr != "weight" or param is None or param.dim() != 2:
        return None
    if isinstance(module, torch.nn.Linear):
        return 0
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D: [in, out]
        return 1
    return None


def row_axes(
    model: Any, names: Sequence[str], tied: Mapping[str, str] | None = None
) -> dict[str, int]:
    """The output axis of every tensor (0: Linear ``[out, in]``, 1: Conv1D ``[in, out]``).

    A tied weight counts through any of its names (an embedding tied to a Linear LM head:
    the head's rows). ``tied``: alias -> stored name (``ArchitectureMap.tied``). Raises
    InvalidInput for a tensor that is not the 2-D weight of one of those (no output rows).
    """
    aliases: dict[str, list[str]] = {}
    for alias, stored in (tied or {}).items():
        aliases.setdefault(stored, []).append(alias)
    out: dict[str, int] = {}
    for name in names:
        axis = _module_axis(model, name)
        for alias in aliases.get(name, []):
            axis = _module_axis(model, alias) if axis is None else axis
        if axis is None:
            raise InvalidInput(
                f"--per row compares weights within each output row of a linear layer, but "
                f"{name!r} is not a 2-D Linear/Conv1D weight; rank a run that scored only "
                "linear weights (e.g. --metric wanda) or narrow --components, or use --per tensor"
            )
        out[name] = axis
    return out


def _rows_view(scores: np.ndarray, shape: Sequence[int], axis: int | None) -> np.ndarray:
    """Scores as ``[groups, members]``: rows of the output axis, or one row (whole tensor)."""
    if axis is None:
        return scores.reshape(1, -1)
    matrix = scores.reshape(shape)
    return matrix if axis == 0 else matrix.T


def select_rows(codes: np.ndarray, k_rows: np.ndarray) -> np.ndarray:
    """Bool ``[rows, cols]``: in each row its ``k_rows[r]`` smallest codes, ties to lower columns.

    ``k_rows[r]`` must not exceed the row's non-NaN codes (NaN codes are the largest).
    """
    chosen = np.zeros(codes.shape, dtype=bool)
    for k in np.unique(k_rows).tolist():  # distinct per-row counts, not weights
        if k == 0:
            continue
        rows = np.flatnonzero(k_rows == k)
        sub = codes if rows.size == codes.shape[0] else codes[rows]
        kth = np.partition(sub, k - 1, axis=1)[:, k - 1 : k]
        keep = sub < kth
        need = k - keep.sum(axis=1)
        r, c = np.nonzero(sub == kth)  # row-major: by row, then column
        first = np.searchsorted(r, r, side="left")
        rank_in_row = np.arange(r.size) - first
        take = rank_in_row < need[r]
        keep[r[take], c[take]] = True
        chosen[rows] = keep
    return chosen


def _chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    from cwa import ranking_store

    step = max(1, ranking_store.SLICE // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _tensor_mask(scores: np.ndarray, percent: Fraction, by: str, bottom: bool) -> np.ndarray:
    """Flat mask of a tensor's own top (bottom) fraction: radix select over its slices."""
    from cwa.ranking_store import _order_bits, _slices, radix_threshold

    n_valid = int(scores.size - np.isnan(scores).sum())
    k = int(group_k(n_valid, percent))
    chosen = np.zeros(scores.size, dtype=bool)
    if k == 0:
        return chosen

    def pieces() -> Iterator[np.ndarray]:
        for _, piece in _slices(scores):
            yield _order_bits(piece, by, bottom)

    _, threshold, ties_left, _ = radix_threshold(pieces, k)
    for start, piece in _slices(scores):
        codes = _order_bits(piece, by, bottom)
        part = chosen[start : start + piece.size]
        np.less(codes, threshold, out=part)
        if ties_left > 0:
            tied = np.flatnonzero(codes == threshold)[:ties_left]
            part[tied] = True
            ties_left -= int(tied.size)
    return chosen


def _row_mask(
    scores: np.ndarray, shape: Sequence[int], axis: int, percent: Fraction, by: str, bottom: bool
) -> np.ndarray:
    """Flat mask (storage order) of each output row's top (bottom) fraction."""
    from cwa.ranking_store import _order_bits

    view = _rows_view(scores, shape, axis)
    chosen = np.zeros(shape, dtype=bool)
    chosen_view = chosen if axis == 0 else chosen.T
    for rows in _chunks(view.shape[0], view.shape[1]):
        codes = _order_bits(np.ascontiguousarray(view[rows]), by, bottom)
        n_valid = (codes != _NAN).sum(axis=1)
        chosen_view[rows] = select_rows(codes, group_k(n_valid, percent))
    return chosen.reshape(-1)


def _group_sizes(scores: np.ndarray, shape: Sequence[int], axis: int | None) -> np.ndarray:
    """Non-NaN count of every group of one tensor (one group without ``axis``)."""
    return (~np.isnan(_rows_view(scores, shape, axis))).sum(axis=1)


def select_grouped(
    score_path: str | Path,
    k: str,
    out_path: str | Path,
    *,
    per: str,
    by: str = "value",
    bottom: bool = False,
    names: Sequence[str] | None = None,
    axes: Mapping[str, int] | None = None,
) -> SelectionSummary:
    """Write the top (bottom) ``k`` = N% of each group (``per`` tensor or row) to ``out_path``.

    Same artifact format as :func:`cwa.ranking_store.select_k`, plus ``per``, per-tensor
    ``row_axis`` and ``group_sizes`` (``[[n_valid, n_groups], ...]``) in the header. ``axes``
    (from :func:`row_axes`) is required for ``per="row"``.
    """
    from cwa.ranking_store import FORMAT, _encode, _tensors

    if per not in ("tensor", "row"):
        raise InvalidInput(f"per={per!r}: a grouped selection is per 'tensor' or 'row'")
    if by not in ("value", "abs"):
        raise InvalidInput(f"by={by!r}: rank by 'value' or 'abs'")
    percent = percent_of(k)
    score_path, out_path = Path(score_path), Path(out_path)
    from cwa.scorefile import read_score_header

    header, _ = read_score_header(score_path)
    names = list(names) if names is not None else list(header)
    if per == "row":
        missing = [n for n in names if axes is None or n not in axes]
        if missing:
            raise InvalidInput(f"no output axis for {missing[0]!r}; pass axes=row_axes(model, ...)")
    from cwa.ranking_store import SelectionSummary

    summary = SelectionSummary(0, 0, None, bottom, by)
    sizes: dict[int, int] = {}
    entries: list[dict[str, Any]] = []
    offset = 0
    with out_path.open("wb") as out:
        for name, scores in _tensors(score_path, names):
            shape = tuple(int(d) for d in header[name]["shape"])
            axis = None if per == "tensor" else int(axes[name])  # type: ignore[index]
            values, repeats = np.unique(_group_sizes(scores, shape, axis), return_counts=True)
            for n, c in zip(values.tolist(), repeats.tolist(), strict=True):
                sizes[n] = sizes.get(n, 0) + c
            if axis is None:
                chosen = _tensor_mask(scores, percent, by, bottom)
            else:
                chosen = _row_mask(scores, shape, axis, percent, by, bottom)
            count = int(chosen.sum())
            data, encoding = _encode(chosen, count)
            out.write(data)
            entries.append(
                {"name": name, "numel": int(scores.size), "encoding": encoding, "offset": offset,
                 "length": len(data), "count": count, "shape": list(shape), "row_axis": axis}
            )  # fmt: skip
            summary.counts[name] = count
            summary.k += count
            offset += len(data)
    summary.n_candidates = sum(n * c for n, c in sizes.items())
    summary.bytes_written = offset
    group_sizes = sorted([n, c] for n, c in sizes.items())
    if summary.k == 0:
        raise InvalidInput(
            f"--topk {k} --per {per} selects no weight (every {per} has too few scored weights "
            "for that fraction); raise the fraction"
        )
    head = {"format": FORMAT, "k": summary.k, "by": by, "bottom": bottom, "threshold_key": None,
            "per": per, "percent": str(percent), "n_candidates": summary.n_candidates,
            "group_sizes": group_sizes, "tensors": entries}  # fmt: skip
    Path(f"{out_path}.json").write_text(json.dumps(head))
    summary.per, summary.group_sizes = per, group_sizes
    return summary


def group_ids(flat: np.ndarray, shape: Sequence[int], axis: int | None) -> np.ndarray:
    """Group (output row) of each flat index; 0 for every index without ``axis``."""
    if axis is None:
        return np.zeros(flat.shape, dtype=np.int64)
    n_cols = int(np.prod(shape[1:]))
    return flat // n_cols if axis == 0 else flat % n_cols


def prefix_grouped(
    selection_path: str | Path, score_path: str | Path, percent: Fraction
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, ascending int64 flat indices): the first ``floor(n_g·p/100 + 1/2)`` of every
    group's stored selection, in the group's order (key code, then flat index)."""
    from cwa.ranking_store import _order_bits, iter_selection
    from cwa.scorefile import open_scores

    selection_path = Path(selection_path)
    header = json.loads(Path(f"{selection_path}.json").read_text())
    stored = Fraction(header["percent"])
    if not 0 < percent <= stored:
        raise InvalidInput(
            f"k = {float(percent):g}% is outside the stored ranking's (0, {float(stored):g}%]; "
            "lower k or re-rank with a larger --topk"
        )
    by, bottom = str(header["by"]), bool(header["bottom"])
    info = {entry["name"]: entry for entry in header["tensors"]}
    with open_scores(score_path) as reader:
        for name, indices in iter_selection(selection_path):
            if indices.size == 0:
                continue
            entry = info[name]
            shape, axis = entry["shape"], entry["row_axis"]
            scores = reader.get(name).float().numpy().reshape(-1)
            want = group_k(_group_sizes(scores, shape, axis), percent)
            codes = _order_bits(scores[indices], by, bottom)
            groups = group_ids(indices, shape, axis)
            order = np.lexsort((indices, codes, groups))
            sorted_groups = groups[order]
            first = np.searchsorted(sorted_groups, sorted_groups, side="left")
            keep = order[(np.arange(order.size) - first) < want[sorted_groups]]
            chosen = np.sort(indices[keep]).astype(np.int64, copy=False)
            if chosen.size:
                yield name, chosen
