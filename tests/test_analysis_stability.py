"""stability: RBO, top-k agreement and rank correlations vs brute force and scipy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _analysis_world import (
    add_score_run,
    gpt2_config,
    named_query,
    param_shapes,
    random_scores,
    run_count,
    save_config_model,
)
from scipy import stats

from cwa.analysis.rbo import rbo
from cwa.analysis.stability import bootstrap_ci
from cwa.errors import InvalidInput
from cwa.stages.analyze import AnalyzeConfig, run_analyze


def _plain_rbo(a, b, p):
    k = len(a)
    x = [len(set(a[:d]) & set(b[:d])) for d in range(1, k + 1)]
    return x[-1] / k * p**k + (1 - p) / p * sum(x[d - 1] / d * p**d for d in range(1, k + 1))


def _orderings(ids, keys):
    groups, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and keys[j] == keys[i]:
            j += 1
        groups.append(ids[i:j])
        i = j
    for combo in itertools.product(*[list(itertools.permutations(g)) for g in groups]):
        yield [x for g in combo for x in g]


def test_rbo_tie_aware_equals_brute_force_average():
    rng = np.random.default_rng(0)
    for _ in range(25):
        k = 7
        a, b = rng.permutation(12)[:k], rng.permutation(12)[:k]
        ka = -np.sort(rng.integers(0, 4, k)).astype(float)
        kb = -np.sort(rng.integers(0, 4, k)).astype(float)
        p = float(rng.uniform(0.5, 0.95))
        brute = np.mean(
            [_plain_rbo(x, y, p) for x in _orderings(list(a), ka) for y in _orderings(list(b), kb)]
        )
        assert rbo(a, ka, b, kb, p) == pytest.approx(brute, abs=1e-12)


def test_rbo_without_ties_and_extremes():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.permutation(300)[:60], rng.permutation(300)[:60]
        keys = -np.arange(60.0)
        assert rbo(a, keys, b, keys, 0.9) == pytest.approx(_plain_rbo(list(a), list(b), 0.9))
    ids = np.arange(50)
    assert rbo(ids, -ids * 1.0, ids, -ids * 1.0, 0.95) == pytest.approx(1.0)
    assert rbo(ids, -ids * 1.0, ids + 100, -ids * 1.0, 0.95) == 0.0


def test_bootstrap_ci_matches_loop():
    rng = np.random.default_rng(5)
    r = 4
    m = rng.uniform(size=(r, r))
    m = (m + m.T) / 2
    np.fill_diagonal(m, np.nan)
    low, high = bootstrap_ci(m, 500, 0.9, seed=3)
    draws = np.random.default_rng(3).integers(0, r, size=(500, r))
    means = []
    for idx in draws:
        vals = [m[idx[i], idx[j]] for i in range(r) for j in range(i + 1, r)]
        vals = [v for v in vals if not np.isnan(v)]
        if vals:
            means.append(np.mean(vals))
    assert low == pytest.approx(np.quantile(means, 0.05))
    assert high == pytest.approx(np.quantile(means, 0.95))
    assert bootstrap_ci(m[:2, :2], 500, 0.9, seed=3) == (None, None)


@pytest.fixture
def three_runs(store, tmp_path):
    config = gpt2_config(n_layer=2, n_embd=16, n_head=4)
    model_dir = save_config_model(config, tmp_path / "gpt2")
    shapes = param_shapes(config)
    base = random_scores(shapes, seed=10)
    runs, ids = [], []
    for seed in range(3):
        noise = random_scores(shapes, seed=100 + seed)
        scores = {n: base[n] * noise[n] ** 0.5 for n in shapes}  # correlated, no ties
        runs.append(scores)
        ids.append(add_score_run(store, model_dir, scores, seed=seed, experiment="seeds"))
    return {"model_dir": model_dir, "runs": runs, "ids": ids, "shapes": shapes}


def _flat(scores, names):
    return np.concatenate([scores[n].reshape(-1).numpy() for n in names]).astype(np.float64)


def _brute(va, vb, k, p, members=None):
    """Exact top-k by (score desc, global id asc) among ``members`` and every statistic."""
    ids = np.arange(va.size) if members is None else members
    order_a = ids[np.lexsort((ids, -va[ids]))][:k]
    order_b = ids[np.lexsort((ids, -vb[ids]))][:k]
    overlap = len(set(order_a) & set(order_b))
    union = np.union1d(order_a, order_b)
    return {
        "overlap": overlap,
        "jaccard": overlap / union.size,
        "rbo": _plain_rbo(list(order_a), list(order_b), p),
        "spearman": stats.spearmanr(va[union], vb[union]).statistic,
        "kendall": stats.kendalltau(va[union], vb[union]).statistic,
    }


def test_stability_matches_brute_force(store, three_runs):
    from cwa.analysis.archmap import architecture_from_config

    outcome = run_analyze(
        store,
        AnalyzeConfig(
            "stability", input_experiment="seeds", options={"k_values": "10,200,1%", "p": "0.9"}
        ),
        mlflow=False,
    )
    names = list(three_runs["shapes"])
    arch = architecture_from_config(gpt2_config(n_layer=2, n_embd=16, n_head=4))
    flats = [_flat(s, names) for s in three_runs["runs"]]
    sizes = [three_runs["shapes"][n] for n in names]
    starts = np.cumsum([0] + [int(np.prod(s)) for s in sizes])
    layer0 = np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for i, n in enumerate(names) if ".h.0." in n]
    )
    q_members = np.concatenate(
        [
            starts[i] + np.flatnonzero(arch.component_ids(n).reshape(-1).numpy() == 2)
            for i, n in enumerate(names)
            if "attn_q" in arch.params[n].components
        ]
    )
    with store.read() as con:
        cur = con.execute(
            "SELECT run_a, run_b, scope, group_key, k, overlap, jaccard, rbo, spearman, kendall "
            "FROM analysis_stability WHERE run_id = ?",
            [outcome.run_id],
        )
        rows = cur.fetchall()
    ids = three_runs["ids"]
    checked = 0
    for run_a, run_b, _scope, group, k, overlap, jaccard, rbo_value, rho, tau in rows:
        members = {"all": None, "layer=0": layer0, "attn_q": q_members}.get(group)
        if members is None and group != "all":
            continue
        a, b = ids.index(run_a), ids.index(run_b)
        expected = _brute(flats[a], flats[b], k, 0.9, members)
        assert overlap == expected["overlap"]
        assert jaccard == pytest.approx(expected["jaccard"])
        assert rbo_value == pytest.approx(expected["rbo"], abs=1e-9)
        assert rho == pytest.approx(expected["spearman"], abs=1e-9)
        assert tau == pytest.approx(expected["kendall"], abs=1e-9)
        checked += 1
    assert checked == 3 * 3 * 3  # pairs x groups x k (1% of each group is within it)
    n_total = flats[0].size
    with store.read() as con:
        ks = {
            r[0]
            for r in con.execute(
                "SELECT k FROM analysis_stability WHERE run_id = ? AND scope = 'global'",
                [outcome.run_id],
            ).fetchall()
        }
        summary = con.execute(
            "SELECT n_pairs, mean, ci_low, ci_high, ci_method FROM analysis_stability_summary "
            "WHERE run_id = ? AND scope = 'global' AND statistic = 'jaccard' AND k = 200",
            [outcome.run_id],
        ).fetchone()
        layers = con.execute(
            "SELECT layer, jaccard FROM analysis_stable_layers WHERE run_id = ? AND k = 10",
            [outcome.run_id],
        ).fetchall()
    assert ks == {10, 200, round(0.01 * n_total)}
    jaccards = [
        _brute(flats[a], flats[b], 200, 0.9)["jaccard"] for a, b in [(0, 1), (0, 2), (1, 2)]
    ]
    assert summary[0] == 3 and summary[1] == pytest.approx(np.mean(jaccards))
    assert summary[2] <= summary[1] <= summary[3] and summary[4] == "bootstrap_runs"
    assert {layer for layer, _ in layers} == {0, 1}
    with store.read() as con:
        named = con.execute(named_query("most_stable_layers")).fetchall()
        direct = con.execute(
            "SELECT group_key, k, mean FROM analysis_stability_summary WHERE run_id = ? "
            "AND scope = 'layer' AND statistic = 'jaccard' ORDER BY k, mean DESC",
            [outcome.run_id],
        ).fetchall()
    assert [(f"layer={r[0]}", round(r[3], 4)) for r in named] == [
        (g, round(m, 4)) for g, _, m in direct
    ]
    assert outcome.metrics["jaccard_at_200"] == pytest.approx(np.mean(jaccards))


def test_stability_bad_inputs_register_nothing(store, three_runs, tmp_path):
    other_config = gpt2_config(n_layer=1)
    other_dir = save_config_model(other_config, tmp_path / "other")
    other = add_score_run(store, other_dir, random_scores(param_shapes(other_config), 0))
    ids = three_runs["ids"]
    before = run_count(store)
    n_total = sum(int(np.prod(s)) for s in three_runs["shapes"].values())
    cases = [
        (AnalyzeConfig("stability", runs=[ids[0]]), "needs at least 2 score runs, got 1"),
        (AnalyzeConfig("stability", runs=[ids[0], other]), "different models"),
        (
            AnalyzeConfig("stability", runs=ids[:2], options={"k_values": str(n_total + 1)}),
            "larger than the ranking",
        ),
        (AnalyzeConfig("stability", runs=ids[:2], options={"p": "1.0"}), "between 0 and 1"),
        (AnalyzeConfig("stability", runs=ids[:2], options={"scopes": "heads"}), "unknown scope"),
    ]
    for config, message in cases:
        with pytest.raises(InvalidInput, match=message):
            run_analyze(store, config, mlflow=False)
    assert run_count(store) == before


def test_tracked_topk_matches_running_topk_with_ties():
    from cwa.analysis.topk import TrackedTopK
    from cwa.ranking import RunningTopK

    rng = np.random.default_rng(11)
    sizes = [50, 7, 300, 1, 120]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for k in (1, 5, 40, 1000):
        plain, tracked = RunningTopK(k), TrackedTopK(k, 1, offsets)
        seen_others = []
        for position, n in enumerate(sizes):
            keys = rng.integers(0, 6, n).astype(np.float32)  # many ties
            other = rng.normal(size=n).astype(np.float32)
            seen_others.append(other)
            flats = np.flatnonzero(rng.uniform(size=n) < 0.8) if position == 2 else None
            chosen = keys if flats is None else keys[flats]
            plain.offer(position, chosen, flats)
            tracked.offer(position, chosen, flats, [other])
            gids, held_keys, payload = tracked.head(k)
            np.testing.assert_array_equal(held_keys, plain.keys)
            np.testing.assert_array_equal(gids, offsets[plain.positions] + plain.flats)
            expected = [
                seen_others[p][f] for p, f in zip(plain.positions, plain.flats, strict=True)
            ]
            np.testing.assert_array_equal(payload[:, 0], np.array(expected, dtype=np.float32))
