"""``cwa perturb --k-values 10%,50%`` over a pruning-scale ranking: prefixes of the stored
selection equal a brute-force sort; counts, matched controls and restoration through the CLI;
bad fractions register nothing."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from cwa.errors import InvalidInput
from cwa.ranking_prefix import check_k_text, prefix_selection
from cwa.ranking_store import select_k
from cwa.scorefile import open_scores, write_score_file

SHAPES = {"a.weight": (40, 30), "b.bias": (30,), "c.weight": (25, 50), "d.weight": (7, 3)}


def _brute_order(tensors: dict[str, np.ndarray], by: str, bottom: bool) -> list[tuple[str, int]]:
    """Every scored weight in rank order: numpy lexsort of (key, tensor order, flat index)."""
    keys, order, flat = [], [], []
    for i, values in enumerate(tensors.values()):
        v = values.reshape(-1).astype(np.float64)
        keep = ~np.isnan(v)
        key = np.abs(v) if by == "abs" else v
        keys.append(key[keep] if bottom else -key[keep])
        order.append(np.full(int(keep.sum()), i))
        flat.append(np.flatnonzero(keep))
    keys, order, flat = np.concatenate(keys), np.concatenate(order), np.concatenate(flat)
    names = list(tensors)
    return [(names[int(order[j])], int(flat[j])) for j in np.lexsort((flat, order, keys))]


@pytest.mark.parametrize("by", ["value", "abs"])
@pytest.mark.parametrize("bottom", [False, True])
def test_prefix_equals_brute_force(tmp_path: Path, by: str, bottom: bool) -> None:
    rng = np.random.default_rng(3 + bottom)
    tensors = {}
    for name, shape in SHAPES.items():
        values = rng.normal(size=shape).astype(np.float32)
        values.reshape(-1)[rng.random(values.size) < 0.2] = np.float32(0.5)  # heavy ties
        values.reshape(-1)[rng.random(values.size) < 0.1] = np.float32(-0.5)
        values.reshape(-1)[rng.random(values.size) < 0.05] = np.nan  # not scored
        tensors[name] = values
    path = tmp_path / "scores.safetensors"
    write_score_file(path, {n: torch.from_numpy(v) for n, v in tensors.items()})
    order = _brute_order(tensors, by, bottom)
    k = len(order) * 6 // 10
    select_k(path, k, tmp_path / "sel.bin", by=by, bottom=bottom)
    for k_prime in [1, 2, 37, k // 3, k // 2, k - 1, k]:
        got = [
            (name, int(i))
            for name, idx in prefix_selection(tmp_path / "sel.bin", path, k_prime)
            for i in idx
        ]
        assert len(got) == k_prime
        assert set(got) == set(order[:k_prime]), k_prime
    with pytest.raises(InvalidInput, match="outside"):
        list(prefix_selection(tmp_path / "sel.bin", path, k + 1))


@pytest.mark.parametrize("text", ["0%", "150%", "abc", "-3", "0", "%"])
def test_bad_k_text(text: str) -> None:
    with pytest.raises(InvalidInput):
        check_k_text(text)


def _runs(store_path: Path) -> list[tuple]:
    con = duckdb.connect(str(store_path / "cwa.duckdb"), read_only=True)
    try:
        return con.execute("SELECT run_id, stage, status FROM runs ORDER BY run_id").fetchall()
    finally:
        con.close()


def _scores(path: Path) -> dict[str, np.ndarray]:
    with open_scores(path) as reader:
        return {n: reader.get(n).float().numpy().reshape(-1) for n in reader.names()}


@pytest.mark.slow
def test_perturb_fractions_end_to_end(cli, store_path, toy_env, one_thread) -> None:
    from cwa.ranking_prefix import CompactRanking

    assert cli("score", "--model", "toy", "--metric", "magnitude").exit_code == 0
    result = cli("rank", "latest:score", "--topk", "50%")
    assert result.exit_code == 0, result.output
    (score_id, *_), (rank_id, *_) = _runs(store_path)
    score_path = store_path / "artifacts" / score_id / "scores.safetensors"
    tensors = _scores(score_path)
    order = _brute_order(tensors, "value", False)  # magnitude is unsigned: ranked by value
    n = len(order)
    expected_k = {10: round(0.1 * n), 50: round(0.5 * n)}
    ranking = CompactRanking(store_path / "artifacts" / rank_id / "selection.bin", score_path)
    for k in expected_k.values():  # the treatment perturb builds is the brute-force prefix
        got = {(name, int(i)) for name, idx in ranking.prefix(k).items() for i in idx}
        assert got == set(order[:k])

    before = _runs(store_path)
    for bad in ["0%", "150%", "abc", "60%"]:  # 60% > the ranking's 50%: refused too
        result = cli("perturb", rank_id, "--k-values", f"10%,{bad}", "--eval", "perplexity")
        assert result.exit_code != 0 and "Error:" in result.output, (bad, result.output)
        assert _runs(store_path) == before

    result = cli(
        "perturb", rank_id, "--k-values", "10%,50%", "--controls", "random_k,bottom_k",
        "--eval", "perplexity", "--limit", "20",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    perturb_id = _runs(store_path)[-1][0]
    con = duckdb.connect(str(store_path / "cwa.duckdb"), read_only=True)
    conditions = con.execute(
        "SELECT condition_id, selection, k, n_changed, restored FROM perturbation_conditions "
        "WHERE run_id = ?",
        [perturb_id],
    ).fetchall()
    groups = con.execute(
        "SELECT condition_id, group_key, k FROM condition_groups WHERE run_id = ?", [perturb_id]
    ).fetchall()
    config = json.loads(
        con.execute("SELECT config FROM runs WHERE run_id = ?", [perturb_id]).fetchone()[0]
    )
    ppl = con.execute(
        "SELECT condition_id, value FROM evaluations WHERE run_id = ? AND metric = 'perplexity'",
        [perturb_id],
    ).fetchall()
    con.close()
    assert sorted(config["k_values"]) == sorted(expected_k.values())
    assert len(conditions) == 6
    for cond_id, _selection, k, n_changed, restored in conditions:
        assert k in expected_k.values() and restored, cond_id
        assert n_changed == k  # sign_flip changes the stored bits of every selected weight
    by_condition: dict[str, dict[str, int]] = {}
    for cond_id, label, k in groups:
        by_condition.setdefault(cond_id, {})[label] = k
    for cond_id, _selection, k, *_ in conditions:
        treatment = next(c[0] for c in conditions if c[1] == "top_k" and c[2] == k)
        assert by_condition[cond_id] == by_condition[treatment]
        assert sum(by_condition[cond_id].values()) == k
    assert len(ppl) == 7 and all(np.isfinite(v) for _, v in ppl)  # baseline + 6 conditions


@pytest.mark.slow
def test_fraction_rank_with_components(cli, store_path, toy_env, one_thread) -> None:
    assert cli("score", "--model", "toy", "--metric", "magnitude").exit_code == 0
    result = cli("rank", "latest:score", "--topk", "50%", "--bottom",
                 "--components", "mlp_up,mlp_down")  # fmt: skip
    assert result.exit_code == 0, result.output
    (score_id, *_), (rank_id, *_) = _runs(store_path)
    tensors = _scores(store_path / "artifacts" / score_id / "scores.safetensors")
    mlp = {n: v for n, v in tensors.items() if ".mlp.c_fc.weight" in n or ".mlp.c_proj.weight" in n
           or ".mlp.c_fc.bias" in n or ".mlp.c_proj.bias" in n}  # fmt: skip
    order = _brute_order(mlp, "value", True)
    from cwa.ranking_store import iter_selection

    artifact = store_path / "artifacts" / rank_id / "selection.bin"
    got = {(name, int(i)) for name, idx in iter_selection(artifact) for i in idx}
    assert got == set(order[: round(0.5 * len(order))])
