"""``--per tensor|row`` selections and their prefixes equal a brute-force sort per group
(ties, NaN, signs, both layouts: Linear [out, in] and Conv1D [in, out])."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from cwa.errors import InvalidInput
from cwa.ranking_groups import (
    check_per,
    group_k,
    percent_of,
    prefix_grouped,
    select_grouped,
    select_rows,
    total_k,
)
from cwa.ranking_store import iter_selection
from cwa.scorefile import write_score_file

# name -> (shape, output axis): 0 = Linear [out, in], 1 = Conv1D [in, out]
TENSORS = {"a.weight": ((40, 30), 0), "b.weight": ((30, 45), 1), "c.weight": ((25, 50), 0),
           "d.weight": ((7, 3), 1)}  # fmt: skip


@pytest.fixture(autouse=True, params=[1 << 22, 64])
def _slice(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole tensors in one chunk, and chunks of a few rows / 64-element slices."""
    monkeypatch.setattr("cwa.ranking_store.SLICE", request.param)


def _score_file(tmp_path: Path, seed: int, nan: float = 0.05) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (shape, _) in TENSORS.items():
        values = rng.normal(size=shape).astype(np.float32)
        flat = values.reshape(-1)
        flat[rng.random(flat.size) < 0.2] = np.float32(0.5)  # heavy ties
        flat[rng.random(flat.size) < 0.1] = np.float32(-0.5)
        flat[rng.random(flat.size) < 0.03] = np.float32(-0.0)  # -0.0 ties with 0.0
        flat[rng.random(flat.size) < 0.03] = np.float32(0.0)
        flat[rng.random(flat.size) < nan] = np.nan  # not scored
        tensors[name] = values
    path = tmp_path / f"scores{seed}.safetensors"
    write_score_file(path, {n: torch.from_numpy(v) for n, v in tensors.items()})
    return path, tensors


def _half_up(n: int, percent: Fraction) -> int:
    """floor(n * p / 100 + 1/2), with Python's exact fractions."""
    return int(Fraction(n) * percent / 100 + Fraction(1, 2))


def _brute(tensors, per: str, percent: Fraction, by: str, bottom: bool) -> set[tuple[str, int]]:
    """Per group: numpy lexsort of (key, flat index) over the group's scored weights."""
    out = set()
    for name, values in tensors.items():
        shape, axis = TENSORS[name]
        flat_index = np.arange(values.size).reshape(shape)
        if per == "tensor":
            groups = [(values.reshape(-1), flat_index.reshape(-1))]
        else:
            v = values if axis == 0 else values.T
            f = flat_index if axis == 0 else flat_index.T
            groups = list(zip(v, f, strict=True))
        for vals, flats in groups:
            v64 = vals.astype(np.float64)
            keep = ~np.isnan(v64)
            key = np.abs(v64[keep]) if by == "abs" else v64[keep]
            key = key if bottom else -key
            idx = flats[keep]
            order = np.lexsort((idx, key))[: _half_up(int(keep.sum()), percent)]
            out.update((name, int(i)) for i in idx[order])
    return out


AXES = {name: axis for name, (_, axis) in TENSORS.items()}


@pytest.mark.parametrize("per", ["tensor", "row"])
@pytest.mark.parametrize("by", ["value", "abs"])
@pytest.mark.parametrize("bottom", [False, True])
@pytest.mark.parametrize("k", ["50%", "10%", "33.3%", "1%", "all"])
def test_grouped_selection_equals_brute_force(tmp_path, per, by, bottom, k) -> None:
    path, tensors = _score_file(tmp_path, seed=len(k) + 3 * bottom)
    out = tmp_path / "sel.bin"
    percent = percent_of(k)
    expected = _brute(tensors, per, percent, by, bottom)
    if not expected:
        with pytest.raises(InvalidInput, match="selects no weight"):
            select_grouped(path, k, out, per=per, by=by, bottom=bottom, axes=AXES)
        return
    summary = select_grouped(path, k, out, per=per, by=by, bottom=bottom, axes=AXES)
    got = {(name, int(i)) for name, idx in iter_selection(out) for i in idx}
    assert got == expected
    assert summary.k == len(expected) == sum(summary.counts.values())
    n_valid = sum(int((~np.isnan(v)).sum()) for v in tensors.values())
    assert summary.n_candidates == n_valid
    assert total_k(summary.group_sizes, percent) == summary.k


def test_rows_follow_the_output_axis(tmp_path) -> None:
    """A Conv1D weight [in, out]: each *column* (one output feature) keeps exactly its half."""
    path, tensors = _score_file(tmp_path, seed=5, nan=0.0)
    select_grouped(path, "50%", tmp_path / "s.bin", per="row", axes=AXES)
    chosen = dict(iter_selection(tmp_path / "s.bin"))
    for name, (shape, axis) in TENSORS.items():
        mask = np.zeros(int(np.prod(shape)), dtype=bool)
        mask[chosen[name]] = True
        per_output = mask.reshape(shape).sum(axis=1 - axis)
        assert (per_output == _half_up(shape[1 - axis], Fraction(50))).all(), name


@pytest.mark.parametrize("per", ["tensor", "row"])
@pytest.mark.parametrize("bottom", [False, True])
def test_prefix_equals_brute_force(tmp_path, per, bottom) -> None:
    path, tensors = _score_file(tmp_path, seed=11 + bottom)
    select_grouped(path, "60%", tmp_path / "s.bin", per=per, by="abs", bottom=bottom, axes=AXES)
    for text in ["1%", "10%", "30%", "59.9%", "60%"]:
        percent = percent_of(text)
        got = {(n, int(i)) for n, idx in prefix_grouped(tmp_path / "s.bin", path, percent)
               for i in idx}  # fmt: skip
        assert got == _brute(tensors, per, percent, "abs", bottom), text
    with pytest.raises(InvalidInput, match="outside"):
        list(prefix_grouped(tmp_path / "s.bin", path, Fraction(61)))


def test_select_rows_ties_and_counts() -> None:
    codes = np.array([[5, 1, 5, 5, 0], [2, 2, 2, 2, 2], [9, 8, 7, 6, 5]], dtype=np.uint32)
    mask = select_rows(codes, np.array([3, 2, 0]))
    assert mask.tolist() == [
        [True, True, False, False, True],  # 0, 1, then the first 5 by column
        [True, True, False, False, False],  # all tied: lowest columns
        [False] * 5,
    ]


def test_counts_round_half_up_exactly() -> None:
    assert group_k(np.array([5, 10, 576, 1, 3]), Fraction(30)).tolist() == [2, 3, 173, 0, 1]
    assert group_k(np.array([7]), Fraction(100)).tolist() == [7]
    assert percent_of("all") == 100 and percent_of("0.5%") == Fraction(1, 2)
    for bad in ("0%", "150%", "x%", "12"):
        with pytest.raises(InvalidInput):
            percent_of(bad)


def test_per_needs_a_fraction() -> None:
    assert check_per("row", "50%") == "row" and check_per("global", 100) == "global"
    for per, topk in (("row", 100), ("tensor", "all"), ("rows", "50%")):
        with pytest.raises(InvalidInput, match="--per"):
            check_per(per, topk)


def test_random_k_by_row_is_matched_uniform_and_seeded(monkeypatch) -> None:
    from cwa.perturbation.scope import ScopeEntry
    from cwa.perturbation.selection import random_k_by_row

    monkeypatch.setattr("cwa.ranking_store.SLICE", 64)  # several chunks of rows
    rng = np.random.default_rng(0)
    shapes = {"lin": ((12, 20), 0), "conv": ((20, 9), 1)}  # conv: Conv1D [in, out]
    mask = torch.from_numpy(rng.random(180) < 0.7)
    scope = [ScopeEntry("lin", 240), ScopeEntry("conv", 180, mask)]
    treatment = {}
    for (name, ((rows, cols), _)), entry in zip(shapes.items(), scope, strict=True):
        eligible = np.ones(rows * cols, bool) if entry.mask is None else entry.mask.numpy()
        drawn = eligible & (rng.random(rows * cols) < 0.4)
        treatment[name] = torch.from_numpy(np.flatnonzero(drawn))
    hits = {name: np.zeros(int(np.prod(s)), dtype=np.int64) for name, (s, _) in shapes.items()}
    n_draws = 400
    for seed in range(n_draws):
        drawn = random_k_by_row(treatment, scope, shapes, seed)
        for name, (shape, axis) in shapes.items():
            idx = drawn[name].numpy()
            assert (np.diff(idx) > 0).all()
            if name == "conv":
                assert mask.numpy()[idx].all()  # never outside the scope
            want = np.zeros(shape, dtype=np.int64)
            have = np.zeros(shape, dtype=np.int64)
            want.reshape(-1)[treatment[name].numpy()] = 1
            have.reshape(-1)[idx] = 1
            assert (want.sum(axis=1 - axis) == have.sum(axis=1 - axis)).all()  # per output row
            hits[name][idx] += 1
    again = random_k_by_row(treatment, scope, shapes, 7)
    first = random_k_by_row(treatment, scope, shapes, 7)
    assert all(torch.equal(again[n], first[n]) for n in shapes)
    # Uniform: each eligible element of row r is drawn with probability c_r / n_r.
    for name, (shape, axis) in shapes.items():
        eligible = np.ones(shape, bool).reshape(-1) if name == "lin" else mask.numpy()
        want = np.zeros(shape, dtype=np.int64)
        want.reshape(-1)[treatment[name].numpy()] = 1
        rows_of = np.broadcast_to(np.arange(shape[axis]).reshape((-1, 1) if axis == 0 else (1, -1)),
                                  shape).reshape(-1)  # fmt: skip
        c = np.bincount(rows_of, weights=want.reshape(-1), minlength=shape[axis])
        n = np.bincount(rows_of, weights=eligible, minlength=shape[axis])
        p = (c / np.maximum(n, 1))[rows_of][eligible]
        observed = hits[name][eligible] / n_draws
        assert np.abs(observed - p).max() < 5 * np.sqrt(0.25 / n_draws)


def test_builtin_random_k_uses_rows_of_a_per_row_ranking(tmp_path) -> None:
    from types import SimpleNamespace

    from cwa.perturbation.builtin_selections import RANDOM_K
    from cwa.perturbation.scope import ScopeEntry
    from cwa.ranking_prefix import CompactRanking

    path, _ = _score_file(tmp_path, seed=2, nan=0.0)
    select_grouped(path, "40%", tmp_path / "s.bin", per="row", axes=AXES)
    ranking = CompactRanking(tmp_path / "s.bin", path)
    assert ranking.control_mode == "tensor" and ranking.row_layout is not None
    treatment = {n: torch.from_numpy(i) for n, i in ranking.prefix(ranking.height).items()}
    scope = [ScopeEntry(n, int(np.prod(s))) for n, (s, _) in TENSORS.items()]
    request = SimpleNamespace(counts={"x": 1}, treatment=treatment, scope=scope, seed=3,
                              ranking=ranking, groups={})  # fmt: skip
    from cwa.perturbation.builtin_selections import BOTTOM_K
    from cwa.scorefile import load_scores

    all_scores = load_scores(path)
    request.key = "value"
    request.scores = lambda entries: ((e.name, all_scores[e.name]) for e in entries)
    for spec in (RANDOM_K, BOTTOM_K):
        drawn = spec.build(request)
        assert drawn.info["matched"] == "per output row"
        for name, (shape, axis) in TENSORS.items():
            have = np.zeros(shape, dtype=np.int64)
            have.reshape(-1)[drawn[name].numpy()] = 1
            assert (have.sum(axis=1 - axis) == _half_up(shape[1 - axis], Fraction(40))).all()


@pytest.mark.parametrize("key", ["abs", "value"])
def test_bottom_k_by_row_equals_brute_force(key) -> None:
    """Per output row: the count of least sensitive scored weights by (zero last, key, column)."""
    from cwa.perturbation.bottom import bottom_k_by_row
    from cwa.perturbation.scope import ScopeEntry

    rng = np.random.default_rng(4)
    shapes = {"lin": ((10, 16), 0), "conv": ((16, 7), 1)}
    scores, treatment = {}, {}
    for name, (shape, _) in shapes.items():
        values = np.round(rng.normal(size=shape), 1).astype(np.float32)  # ties
        values.reshape(-1)[rng.random(values.size) < 0.25] = 0.0  # zero scores
        values.reshape(-1)[:16] = 0.0  # a row (lin) / the first input's outputs (conv): zeros
        values.reshape(-1)[rng.random(values.size) < 0.05] = np.nan
        scores[name] = values
        valid = np.flatnonzero(~np.isnan(values.reshape(-1)))
        treatment[name] = torch.from_numpy(np.sort(rng.choice(valid, valid.size // 3, False)))
    scope = [ScopeEntry(n, int(np.prod(s))) for n, (s, _) in shapes.items()]

    def reader(entries):
        return ((e.name, torch.from_numpy(scores[e.name])) for e in entries)

    got = bottom_k_by_row(reader, treatment, scope, shapes, key=key)
    for name, (shape, axis) in shapes.items():
        flat = np.arange(int(np.prod(shape))).reshape(shape)
        want_counts = np.zeros(shape, dtype=np.int64)
        want_counts.reshape(-1)[treatment[name].numpy()] = 1
        values = scores[name]
        expected = set()
        rows = zip(values if axis == 0 else values.T, flat if axis == 0 else flat.T,
                   want_counts.sum(axis=1 - axis), strict=True)  # fmt: skip
        for vals, idx, count in rows:
            v = vals.astype(np.float64)
            ok = ~np.isnan(v)
            k = np.abs(v[ok]) if key == "abs" else v[ok]
            order = np.lexsort((idx[ok], k, v[ok] == 0))  # zeros last, then key, then column
            expected.update(int(i) for i in idx[ok][order[:count]])
        assert set(got[name].tolist()) == expected, name
    assert got.info["zero_filled"] > 0  # the all-zero row had to be filled from zeros
