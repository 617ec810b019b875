"""Depth pattern of a per-layer statistic: fitted trends and the rules that name the pattern.

The values (e.g. mean |score| per layer) are divided by their mean, so slopes and curvatures
are comparable across models and metrics. Two least-squares fits (``numpy.polyfit``):

- linear in the layer index x = 0..L-1: ``slope`` (change per layer, relative to the mean),
  ``intercept``, ``r2_linear``;
- quadratic in t = x / (L - 1): ``curvature`` (the t**2 coefficient), ``r2_quadratic``, and
  ``vertex_layer`` = the layer of the parabola's extremum.

R² = 1 - SS_res / SS_tot (None when all values are equal). Rules, in order:

1. ``flat``: (max - min) / mean < ``flat_tolerance`` (default 0.10), or fewer than 2 layers.
2. ``peak_middle`` / ``valley``: at least 4 layers, r2_quadratic >= ``min_r2`` (default 0.5),
   r2_quadratic - r2_linear >= ``curvature_gain`` (default 0.15) and the vertex within the middle
   60% of the depth (0.2 <= t <= 0.8); peak when curvature < 0, valley when > 0.
3. ``increasing`` / ``decreasing``: r2_linear >= ``min_r2``; by the sign of the slope. With
   only two layers: by the sign of the difference, and ``r2_linear`` is None (a line through
   two points always fits, so it would claim a quality it does not have).
4. ``irregular``: none of the above (no trend explains the profile well).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PATTERNS = ("increasing", "decreasing", "peak_middle", "valley", "flat", "irregular")


def _r2(y: np.ndarray, fitted: np.ndarray) -> float | None:
    total = float(np.sum((y - y.mean()) ** 2))
    if total <= 0:
        return None
    return 1.0 - float(np.sum((y - fitted) ** 2)) / total


def fit_depth_trend(
    values: Sequence[float],
    *,
    flat_tolerance: float = 0.10,
    min_r2: float = 0.5,
    curvature_gain: float = 0.15,
) -> dict[str, Any]:
    """Fits and pattern of per-layer ``values`` (in layer order); see the module docstring."""
    y = np.asarray(values, dtype=np.float64)
    n = int(y.size)
    row: dict[str, Any] = {
        "n_layers": n,
        "pattern": "flat",
        "slope": None,
        "intercept": None,
        "r2_linear": None,
        "curvature": None,
        "r2_quadratic": None,
        "vertex_layer": None,
        "relative_range": None,
    }
    mean = float(y.mean()) if n else 0.0
    if n < 2 or mean <= 0:
        return row
    rel = y / mean
    x = np.arange(n, dtype=np.float64)
    slope, intercept = np.polyfit(x, rel, 1)
    # A line through two points always fits: with two layers R² says nothing, so none is given.
    r2_lin = _r2(rel, slope * x + intercept) if n >= 3 else None
    row.update(
        slope=float(slope),
        intercept=float(intercept),
        r2_linear=r2_lin,
        relative_range=float((y.max() - y.min()) / mean),
    )
    vertex_t = None
    r2_quad = None
    if n >= 3:
        t = x / (n - 1)
        c2, c1, c0 = np.polyfit(t, rel, 2)
        r2_quad = _r2(rel, c2 * t**2 + c1 * t + c0)
        row.update(curvature=float(c2), r2_quadratic=r2_quad)
        if c2 != 0:
            vertex_t = float(-c1 / (2 * c2))
            row["vertex_layer"] = vertex_t * (n - 1)
    if row["relative_range"] < flat_tolerance:
        row["pattern"] = "flat"
    elif (
        n >= 4
        and r2_quad is not None
        and r2_quad >= min_r2
        and r2_quad - (r2_lin or 0.0) >= curvature_gain
        and vertex_t is not None
        and 0.2 <= vertex_t <= 0.8
    ):
        row["pattern"] = "peak_middle" if row["curvature"] < 0 else "valley"
    elif n == 2 or (r2_lin is not None and r2_lin >= min_r2):
        row["pattern"] = "increasing" if slope > 0 else "decreasing"
    else:
        row["pattern"] = "irregular"
    return row
