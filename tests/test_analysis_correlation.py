"""correlation: metric x metric on seeded samples vs scipy; layer x layer vs numpy."""

from __future__ import annotations

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

from cwa.analysis.correlation import sample_indices
from cwa.errors import InvalidInput
from cwa.stages.analyze import AnalyzeConfig, run_analyze


@pytest.fixture
def two_metrics(store, tmp_path):
    config = gpt2_config(n_layer=3, n_embd=16, n_head=4)
    model_dir = save_config_model(config, tmp_path / "gpt2")
    shapes = param_shapes(config)
    a = random_scores(shapes, seed=1)
    noise = random_scores(shapes, seed=2)
    b = {n: a[n] ** 0.7 * noise[n] for n in shapes}  # a related but different metric
    ids = [
        add_score_run(store, model_dir, a, metric="grad_x_weight"),
        add_score_run(store, model_dir, b, metric="magnitude"),
    ]
    return {"shapes": shapes, "scores": [a, b], "ids": ids}


def _rows(store, run_id, where=""):
    with store.read() as con:
        return con.execute(
            "SELECT kind, scope, group_key, row_key, col_key, statistic, value, n "
            f"FROM analysis_correlation WHERE run_id = ? {where}",
            [run_id],
        ).fetchall()


def test_metric_correlation_matches_scipy_on_the_same_sample(store, two_metrics):
    options = {"sample": "100", "global_sample": "2000", "k": "50", "seed": "7"}
    outcome = run_analyze(
        store, AnalyzeConfig("correlation", runs=two_metrics["ids"], options=options), mlflow=False
    )
    names = list(two_metrics["shapes"])
    a, b = two_metrics["scores"]
    n_total = sum(a[n].numel() for n in names)
    rows = _rows(store, outcome.run_id, "AND kind = 'metric'")
    tensor = {(r[2], r[5]): (r[6], r[7]) for r in rows if r[1] == "tensor"}
    parts_a, parts_b = [], []
    for position, name in enumerate(names):
        va, vb = a[name].reshape(-1).numpy(), b[name].reshape(-1).numpy()
        m_global = round(2000 * va.size / n_total)
        idx = sample_indices(va.size, max(100, m_global), 7, position)
        m = min(100, va.size)
        x, y = va[idx[:m]].astype(np.float64), vb[idx[:m]].astype(np.float64)
        assert tensor[(name, "spearman")] == (pytest.approx(stats.spearmanr(x, y).statistic), m)
        assert tensor[(name, "kendall")][0] == pytest.approx(stats.kendalltau(x, y).statistic)
        parts_a.append(va[idx[:m_global]])
        parts_b.append(vb[idx[:m_global]])
    ga, gb = np.concatenate(parts_a), np.concatenate(parts_b)
    glob = {r[5]: (r[6], r[7]) for r in rows if r[1] == "global"}
    assert glob["spearman"] == (pytest.approx(stats.spearmanr(ga, gb).statistic), ga.size)
    assert abs(ga.size - 2000) <= len(names)
    flat_a = np.concatenate([a[n].reshape(-1).numpy() for n in names])
    flat_b = np.concatenate([b[n].reshape(-1).numpy() for n in names])
    top = len(set(np.argsort(-flat_a)[:50]) & set(np.argsort(-flat_b)[:50])) / 50
    assert glob["topk_overlap"] == (pytest.approx(top), 50)
    with store.read() as con:
        agreement = con.execute(
            "SELECT metric_a, metric_b, value FROM analysis_metric_agreement "
            "WHERE run_id = ? AND statistic = 'spearman'",
            [outcome.run_id],
        ).fetchone()
    assert agreement[:2] == ("grad_x_weight", "magnitude")
    with store.read() as con:
        named = con.execute(named_query("metric_agreement")).fetchall()
    assert ("grad_x_weight", "magnitude", "spearman", round(glob["spearman"][0], 4)) in [
        (r[1], r[2], r[3], r[4]) for r in named
    ]
    assert agreement[2] == pytest.approx(glob["spearman"][0])
    assert outcome.metrics["global_spearman"] == pytest.approx(glob["spearman"][0])


def test_layer_by_layer_matches_numpy(store, two_metrics):
    from cwa.analysis.archmap import architecture_from_config

    run_id = two_metrics["ids"][0]
    outcome = run_analyze(store, AnalyzeConfig("correlation", runs=[run_id]), mlflow=False)
    rows = _rows(store, outcome.run_id, "AND kind = 'layer'")
    assert not _rows(store, outcome.run_id, "AND kind = 'metric'")
    a = two_metrics["scores"][0]
    arch = architecture_from_config(gpt2_config(n_layer=3, n_embd=16, n_head=4))
    comps: dict[tuple[int, str], list[np.ndarray]] = {}
    heads: dict[int, np.ndarray] = {}
    for name, tensor in a.items():
        info = arch.params[name]
        if info.layer is None:
            continue
        ids = arch.component_ids(name).reshape(-1).numpy()
        flat = tensor.reshape(-1).numpy().astype(np.float64)
        for comp in info.components:
            from cwa.models.architecture import COMPONENTS

            comps.setdefault((info.layer, comp), []).append(flat[ids == COMPONENTS.index(comp)])
        if "attn_q" in info.components:
            h = arch.head_ids(name).reshape(-1).numpy()
            member = (ids == 2) & (h >= 0)
            heads[info.layer] = heads.get(info.layer, 0) + np.bincount(
                h[member], weights=flat[member], minlength=4
            )
    names = sorted({c for _, c in comps})
    vectors = {
        layer: np.log10([np.concatenate(comps[(layer, c)]).mean() for c in names])
        for layer in range(3)
    }
    got = {(r[1], r[3], r[4], r[5]): r[6] for r in rows}
    for i in range(3):
        for j in range(3):
            expected = np.corrcoef(vectors[i], vectors[j])[0, 1]
            assert got[("components", f"layer={i}", f"layer={j}", "pearson")] == pytest.approx(
                expected
            )
            hv_i, hv_j = heads[i] / heads[i].sum(), heads[j] / heads[j].sum()
            assert got[("heads", f"layer={i}", f"layer={j}", "spearman")] == pytest.approx(
                stats.spearmanr(hv_i, hv_j).statistic
            )
    assert got[("components", "layer=1", "layer=1", "pearson")] == pytest.approx(1.0)


def test_correlation_k_larger_than_ranking(store, two_metrics):
    before = run_count(store)
    with pytest.raises(InvalidInput, match="larger than the ranking"):
        run_analyze(
            store,
            AnalyzeConfig("correlation", runs=two_metrics["ids"], options={"k": "10000000"}),
            mlflow=False,
        )
    assert run_count(store) == before
