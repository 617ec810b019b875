"""Per-tensor summary statistics of a score tensor (one ``tensor_stats`` row per parameter).

Computed exactly on the in-scope elements as stored (after the cast to the score dtype), with
numpy: one in-place ``partition`` of a float32 array per tensor at the order statistics the row
needs (min, max, both neighbours of every quantile position, the start of the top 1%) gives them
exactly, as a full sort would, in about a third of a sort's time (0.11 s vs 0.32 s for 8.2M
values on one core; ``torch.sort``, which also builds int64 indices, took 0.95 s). The array is
a copy unless the caller lets it be reordered in place; that copy is the only full-size
temporary.

- quantiles (p50, p90, p99, p99_9) use linear interpolation between order statistics, the
  default of ``numpy.quantile`` / ``torch.quantile``: position q * (n - 1) in the sorted values.
- mean, std (population, ddof = 0) and sum are accumulated in float64.
- top1pct_mass_share = sum of the largest ceil(1% of n) values of |s| divided by sum(|s|)
  (None when the tensor has no mass).
- zeros counts exact zeros; nonfinite counts NaN/inf among in-scope elements (the scoring driver
  refuses non-finite scores, so stored files always have 0 there).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

QUANTILES: tuple[tuple[str, float], ...] = (
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("p99_9", 0.999),
)
STAT_COLUMNS: tuple[str, ...] = (
    "numel",
    "mean",
    "std",
    "min",
    "max",
    *(name for name, _ in QUANTILES),
    "sum",
    "top1pct_mass_share",
    "zeros",
    "nonfinite",
)


def _quantile(sorted_values: np.ndarray, q: float) -> float:
    """Linear interpolation at q * (n - 1); needs only positions low and low + 1 in order."""
    position = q * (sorted_values.size - 1)
    low = math.floor(position)
    high = min(low + 1, sorted_values.size - 1)
    fraction = position - low
    lo_value = float(sorted_values[low])
    return lo_value + (float(sorted_values[high]) - lo_value) * fraction


def _population_variance(values: np.ndarray) -> float:
    """Population variance; torch's CPU reduction accumulates float32 input in float64."""
    import torch

    return float(torch.var(torch.from_numpy(values), correction=0, dim=0).double())


def _order_positions(n: int, top: int, nonnegative: bool) -> list[int]:
    """Positions whose order statistics the row reads (see :func:`_quantile`)."""
    positions = {0, n - 1}
    for _, q in QUANTILES:
        low = math.floor(q * (n - 1))
        positions.update((low, min(low + 1, n - 1)))
    if nonnegative:
        positions.add(n - top)  # the top 1% then sits at [n - top:]
    return sorted(positions)


def score_stats(values: np.ndarray, *, overwrite: bool = False) -> dict[str, Any]:
    """Statistics of a 1-D array of in-scope scores (any float dtype; NaN/inf are counted).

    ``overwrite=True`` lets a float32 ``values`` be reordered in place instead of copied.
    """
    values = np.asarray(values)
    if overwrite and values.dtype == np.float32 and values.ndim == 1 and values.flags.writeable:
        ordered = values
    else:
        ordered = np.array(values, dtype=np.float32, copy=True).reshape(-1)
    numel = int(ordered.size)
    row: dict[str, Any] = dict.fromkeys(STAT_COLUMNS)
    row.update(numel=numel, nonfinite=0, zeros=0)
    finite = np.isfinite(ordered)
    if not finite.all():
        ordered = ordered[finite]
        row["nonfinite"] = numel - int(ordered.size)
    del finite
    n = int(ordered.size)
    if n == 0:
        return row
    # -0.0 and 0.0 compare equal, so this counts both kinds of zero.
    row["zeros"] = int(np.count_nonzero(ordered == 0))
    top = math.ceil(0.01 * n)
    nonnegative = bool(ordered.min() >= 0)
    ordered.partition(_order_positions(n, top, nonnegative))  # in place
    row["min"] = float(ordered[0])
    row["max"] = float(ordered[-1])
    for name, q in QUANTILES:
        row[name] = _quantile(ordered, q)
    row["sum"] = float(np.sum(ordered, dtype=np.float64))
    row["mean"] = row["sum"] / n
    row["std"] = math.sqrt(_population_variance(ordered)) if n > 1 else 0.0
    if nonnegative:  # |s| = s and the largest are at the end
        mass = row["sum"]
        top_mass = float(np.sum(ordered[n - top :], dtype=np.float64))
    else:
        magnitudes = np.abs(ordered)
        mass = float(np.sum(magnitudes, dtype=np.float64))
        magnitudes.partition(n - top)  # in place: its own copy
        top_mass = float(np.sum(magnitudes[n - top :], dtype=np.float64))
    row["top1pct_mass_share"] = top_mass / mass if mass > 0 else None
    return row
