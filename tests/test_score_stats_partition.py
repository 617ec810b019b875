"""Score statistics from a partial ordering (np.partition) equal those of a full sort.

The reference here sorts a float64 copy and reads the definitions off it directly (quantiles by
numpy's linear interpolation, top-1% mass of |s|), independently of cwa.metrics.stats.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cwa.metrics.stats import score_stats


def _reference(values: np.ndarray) -> dict[str, float | int | None]:
    finite = values[np.isfinite(values)].astype(np.float64)
    ordered = np.sort(finite)
    n = ordered.size
    ref: dict[str, float | int | None] = {
        "numel": int(values.size),
        "nonfinite": int(values.size - n),
        "zeros": int((ordered == 0).sum()),
    }
    if n == 0:
        return ref
    top = math.ceil(0.01 * n)
    magnitudes = np.sort(np.abs(ordered))
    ref.update(
        min=ordered[0],
        max=ordered[-1],
        p50=np.quantile(ordered, 0.5),
        p90=np.quantile(ordered, 0.9),
        p99=np.quantile(ordered, 0.99),
        p99_9=np.quantile(ordered, 0.999),
        sum=ordered.sum(),
        mean=ordered.mean(),
        std=ordered.std(),
        top1pct_mass_share=magnitudes[-top:].sum() / magnitudes.sum() if magnitudes.sum() else None,
    )
    return ref


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    squared = (rng.standard_normal(20_011) ** 2).astype(np.float32)
    squared[:300] = 0.0
    signed = rng.standard_normal(5_003).astype(np.float32) * 3
    ties = rng.integers(0, 4, 997).astype(np.float32)  # many repeated values
    with_bad = rng.standard_normal(1_000).astype(np.float32)
    with_bad[[3, 500, 999]] = [np.nan, np.inf, -np.inf]
    return [
        squared,
        signed,
        ties,
        with_bad,
        np.array([2.5], dtype=np.float32),
        np.array([1.0, -4.0], dtype=np.float32),
        np.array([np.nan, np.nan], dtype=np.float32),
        np.zeros(10, dtype=np.float32),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
@pytest.mark.parametrize("overwrite", [False, True])
def test_partition_stats_equal_sorted_definitions(case: int, overwrite: bool) -> None:
    values = _cases()[case]
    original = values.copy()
    row = score_stats(values, overwrite=overwrite)
    if not overwrite:
        np.testing.assert_array_equal(values, original)  # the caller's array is untouched
    ref = _reference(original)
    for key, expected in ref.items():
        if expected is None or isinstance(expected, int):
            assert row[key] == expected, key
        elif key in ("min", "max") or key.startswith("p"):
            # order statistics of float32 values: exact (interpolation in float64)
            assert row[key] == pytest.approx(expected, rel=1e-12, abs=1e-30), key
        else:
            assert row[key] == pytest.approx(expected, rel=1e-6, abs=1e-12), key
    if ref["nonfinite"] == ref["numel"]:
        assert row["min"] is None and row["mean"] is None
