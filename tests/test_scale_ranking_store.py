"""Pruning-scale selections equal a brute-force global sort (ties, NaN, signs, k as %/all)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cwa.errors import InvalidInput
from cwa.ranking_store import iter_selection, parse_k, select_k
from cwa.scorefile import write_score_file


@pytest.fixture(autouse=True, params=[1 << 22, 64])
def _slice(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole tensors in one slice, and tensors cut in 64-element slices."""
    monkeypatch.setattr("cwa.ranking_store.SLICE", request.param)

SHAPES = {"a.weight": (40, 30), "b.bias": (30,), "c.weight": (25, 50), "d.weight": (7, 3)}


def _score_file(tmp_path: Path, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in SHAPES.items():
        values = rng.normal(size=shape).astype(np.float32)
        values.reshape(-1)[rng.random(values.size) < 0.2] = np.float32(0.5)  # heavy ties
        values.reshape(-1)[rng.random(values.size) < 0.1] = np.float32(-0.5)
        values.reshape(-1)[rng.random(values.size) < 0.05] = np.nan  # not scored
        tensors[name] = values
    path = tmp_path / f"scores{seed}.safetensors"
    write_score_file(path, {n: torch.from_numpy(v) for n, v in tensors.items()})
    return path, tensors


def _brute_force(tensors: dict[str, np.ndarray], k: int, by: str, bottom: bool) -> set:
    """Sort every (key, tensor order, flat index) with numpy's lexsort; take the first k."""
    keys, order, flat = [], [], []
    for i, values in enumerate(tensors.values()):
        v = values.reshape(-1).astype(np.float64)
        keep = ~np.isnan(v)
        key = np.abs(v) if by == "abs" else v
        keys.append(key[keep] if bottom else -key[keep])
        order.append(np.full(int(keep.sum()), i))
        flat.append(np.flatnonzero(keep))
    keys, order, flat = np.concatenate(keys), np.concatenate(order), np.concatenate(flat)
    idx = np.lexsort((flat, order, keys))[:k]
    names = list(tensors)
    return {(names[int(order[j])], int(flat[j])) for j in idx}


@pytest.mark.parametrize("by", ["value", "abs"])
@pytest.mark.parametrize("bottom", [False, True])
@pytest.mark.parametrize("k", ["1", "10%", "50%", "1234", "all"])
def test_selection_equals_brute_force(tmp_path: Path, by: str, bottom: bool, k: str) -> None:
    path, tensors = _score_file(tmp_path, seed=len(k) + 7 * bottom)
    n_valid = sum(int((~np.isnan(v)).sum()) for v in tensors.values())
    out = tmp_path / "sel.bin"
    summary = select_k(path, k, out, by=by, bottom=bottom)
    expected_k = {"1": 1, "1234": 1234, "all": n_valid}.get(k) or round(
        float(k[:-1]) / 100 * n_valid
    )
    assert summary.k == expected_k and summary.n_candidates == n_valid
    got = {(name, int(i)) for name, idx in iter_selection(out) for i in idx}
    assert got == _brute_force(tensors, expected_k, by, bottom)
    assert sum(summary.counts.values()) == expected_k
    # Compact: never more than 4 bytes per selected weight or 1 bit per weight, per tensor.
    counts = list(summary.counts.values())
    assert summary.bytes_written <= sum(
        min(4 * c, (v.size + 7) // 8) for c, v in zip(counts, tensors.values(), strict=True)
    )


def test_threshold_is_the_kth_key(tmp_path: Path) -> None:
    path, tensors = _score_file(tmp_path, seed=3)
    values = np.concatenate([v.reshape(-1) for v in tensors.values()])
    values = values[~np.isnan(values)]
    summary = select_k(path, 100, tmp_path / "s.bin", by="abs")
    assert summary.threshold_key == pytest.approx(float(np.sort(np.abs(values))[::-1][99]))


def test_bad_k_is_refused(tmp_path: Path) -> None:
    path, _ = _score_file(tmp_path, seed=1)
    for bad in ("0%", "150%", "x", "0", "99999999"):
        with pytest.raises(InvalidInput):
            select_k(path, bad, tmp_path / "bad.bin")
    assert parse_k("50%", 7) == 4 and parse_k("all", 7) == 7 and parse_k(3, 7) == 3
