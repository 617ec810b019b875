"""profile: streamed histogram statistics, depth trends and group masses vs brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _analysis_world import (
    add_score_run,
    gpt2_config,
    llama_gqa_config,
    param_shapes,
    random_scores,
    save_config_model,
)

from cwa.analysis.histogram import LogHistogram, tensor_bins
from cwa.analysis.trend import fit_depth_trend
from cwa.stages.analyze import AnalyzeConfig, run_analyze


def _exact_gini(x: np.ndarray) -> float:
    x = np.sort(x.astype(np.float64))
    n = x.size
    i = np.arange(1, n + 1)
    return float(np.sum((2 * i - n - 1) * x) / (n * x.sum()))


def _exact_top_share(x: np.ndarray, fraction: float = 0.01) -> float:
    top = math.ceil(fraction * x.size)
    x = np.sort(x.astype(np.float64))
    return float(x[-top:].sum() / x.sum())


def _hist(x: np.ndarray) -> LogHistogram:
    h = LogHistogram()
    lo, counts, mass, vmin, vmax = tensor_bins(x.astype(np.float32))
    h.add_bins(lo, counts[0], mass[0], float(vmin[0]), float(vmax[0]))
    return h


@pytest.mark.parametrize("kind", ["lognormal", "uniform", "with_zeros"])
def test_histogram_statistics_match_exact(kind):
    rng = np.random.default_rng(3)
    if kind == "lognormal":
        x = np.exp(rng.normal(0, 3, 50_000))
    elif kind == "uniform":
        x = rng.uniform(0, 1, 50_000)
    else:
        x = np.where(rng.uniform(size=50_000) < 0.3, 0.0, rng.exponential(1e-4, 50_000))
    x = x.astype(np.float32)
    h = _hist(x)
    assert h.n == x.size
    assert h.total == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-9)
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(x.astype(np.float64), q))
        assert h.quantile(q) == pytest.approx(exact, rel=0.01, abs=1e-30)
    assert h.gini() == pytest.approx(_exact_gini(x), abs=0.003)
    assert h.top_share(0.01) == pytest.approx(_exact_top_share(x), abs=0.005)
    assert h.vmin == x.min() and h.vmax == x.max()


def test_histogram_merge_equals_whole_and_grouped_bins():
    rng = np.random.default_rng(0)
    x = np.exp(rng.normal(0, 2, 10_000)).astype(np.float32)
    whole = _hist(x)
    merged = _hist(x[:3000])
    merged.merge(_hist(x[3000:]))
    lo = max(whole.lo, merged.lo)
    np.testing.assert_array_equal(
        whole.counts, merged.counts[whole.lo - merged.lo : whole.lo - merged.lo + whole.counts.size]
    )
    assert merged.lo == lo == whole.lo
    np.testing.assert_allclose(merged.mass, whole.mass, rtol=1e-12)
    groups = rng.integers(0, 3, x.size)
    lo, counts, mass, vmin, vmax = tensor_bins(x, groups, 3)
    for g in range(3):
        part = x[groups == g]
        assert counts[g].sum() == part.size
        assert mass[g].sum() == pytest.approx(float(part.astype(np.float64).sum()), rel=1e-9)
        assert vmin[g] == part.min() and vmax[g] == part.max()


def test_depth_trend_rules_and_fits():
    from scipy import stats

    layers = np.arange(12, dtype=float)
    rising = 1.0 + 0.2 * layers + np.sin(layers) * 0.05
    fit = fit_depth_trend(rising)
    ref = stats.linregress(layers, rising / rising.mean())
    assert fit["pattern"] == "increasing"
    assert fit["slope"] == pytest.approx(ref.slope, rel=1e-9)
    assert fit["r2_linear"] == pytest.approx(ref.rvalue**2, rel=1e-9)
    assert fit_depth_trend(rising[::-1])["pattern"] == "decreasing"
    peak = 5.0 - (layers - 5.5) ** 2 * 0.1
    fit = fit_depth_trend(peak)
    assert fit["pattern"] == "peak_middle" and fit["vertex_layer"] == pytest.approx(5.5)
    t = layers / 11
    c2, c1, c0 = np.polyfit(t, peak / peak.mean(), 2)
    assert fit["curvature"] == pytest.approx(c2, rel=1e-9)
    assert fit_depth_trend(1.0 + (layers - 6.0) ** 2 * 0.1)["pattern"] == "valley"
    assert fit_depth_trend(np.full(12, 2.0) + layers * 1e-3)["pattern"] == "flat"
    zigzag = np.array([1.0, 3.0] * 6)
    assert fit_depth_trend(zigzag)["pattern"] == "irregular"
    two = fit_depth_trend([2.0, 1.0])
    assert (
        two["pattern"] == "decreasing"
        and two["r2_linear"] is None
        and two["slope"] == pytest.approx(-2 / 3)
    )
    assert fit_depth_trend([1.0, 1.01])["pattern"] == "flat"
    # An edge peak (vertex at the last layer) is a rising trend, not a peak in the middle.
    assert fit_depth_trend(1.0 + layers**2 * 0.05)["pattern"] == "increasing"


def _profile_rows(store, run_id):
    with store.read() as con:
        cur = con.execute(
            "SELECT * FROM analysis_profile WHERE run_id = ? ORDER BY level, group_key", [run_id]
        )
        columns = [d[0] for d in cur.description]
        return {
            (r[columns.index("level")], r[columns.index("group_key")]): dict(
                zip(columns, r, strict=True)
            )
            for r in cur.fetchall()
        }


def test_profile_gpt2_groups_match_brute_force(store, tmp_path):
    config = gpt2_config(n_layer=3, n_embd=16, n_head=4)
    model_dir = save_config_model(config, tmp_path / "gpt2")
    scores = random_scores(param_shapes(config), seed=5)
    score_id = add_score_run(store, model_dir, scores)
    outcome = run_analyze(store, AnalyzeConfig("profile", runs=[score_id]), mlflow=False)
    rows = _profile_rows(store, outcome.run_id)
    total = sum(float(t.double().abs().sum()) for t in scores.values())
    assert rows[("model", "all")]["mass"] == pytest.approx(total, rel=1e-9)
    assert rows[("model", "all")]["n"] == sum(t.numel() for t in scores.values())
    d, hd = 16, 4
    for layer in range(3):
        prefix = f"transformer.h.{layer}."
        values = torch.cat([t.reshape(-1) for n, t in scores.items() if n.startswith(prefix)])
        row = rows[("layer", f"layer={layer}")]
        assert row["n"] == values.numel()
        assert row["mass"] == pytest.approx(float(values.double().sum()), rel=1e-9)
        assert row["share"] == pytest.approx(row["mass"] / total, rel=1e-12)
        assert row["gini"] == pytest.approx(_exact_gini(values.numpy()), abs=0.003)
        assert row["p90"] == pytest.approx(float(np.quantile(values.numpy(), 0.9)), rel=0.01)
        # c_attn is a Conv1D [in, 3d]: q = columns [0, d), with the bias's first d entries.
        w = scores[prefix + "attn.c_attn.weight"]
        b = scores[prefix + "attn.c_attn.bias"]
        q = torch.cat([w[:, :d].reshape(-1), b[:d]])
        qrow = rows[("layer_component", f"layer={layer},attn_q")]
        assert qrow["n"] == q.numel()
        assert qrow["mass"] == pytest.approx(float(q.double().sum()), rel=1e-9)
        assert qrow["max"] == pytest.approx(float(q.max()))
        head2 = torch.cat([w[:, 2 * hd : 3 * hd].reshape(-1), b[2 * hd : 3 * hd]])
        hrow = rows[("head", f"layer={layer},attn_q,head=2")]
        assert hrow["n"] == head2.numel()
        assert hrow["mass"] == pytest.approx(float(head2.double().sum()), rel=1e-9)
        # c_proj [d, d]: head h reads input rows [h*hd, (h+1)*hd); its bias belongs to no head.
        o = scores[prefix + "attn.c_proj.weight"][hd : 2 * hd]
        orow = rows[("head", f"layer={layer},attn_o,head=1")]
        assert orow["mass"] == pytest.approx(float(o.double().sum()), rel=1e-9)
        members = [
            r for r in rows.values() if r["level"] == "layer_component" and r["layer"] == layer
        ]
        assert sum(r["share_of_layer"] for r in members) == pytest.approx(1.0)
        assert sorted(r["rank_in_layer"] for r in members) == list(range(1, len(members) + 1))
        densest = max(members, key=lambda r: r["mean"])
        assert densest["rank_in_layer"] == 1
    wte = scores["transformer.wte.weight"].numpy().reshape(-1)
    exact_row = rows[("tensor", "transformer.wte.weight")]  # 800 weights: exact statistics
    assert exact_row["method"] == "exact"
    assert exact_row["top1pct_share"] == pytest.approx(_exact_top_share(wte), rel=1e-9)
    assert exact_row["gini"] == pytest.approx(_exact_gini(wte), rel=1e-9)
    assert exact_row["p90"] == pytest.approx(float(np.quantile(wte.astype(np.float64), 0.9)))
    assert rows[("layer", "layer=0")]["method"] == "histogram"
    histogram_only = run_analyze(
        store,
        AnalyzeConfig("profile", runs=[score_id], options={"exact_limit": "0"}),
        mlflow=False,
    )
    approx_row = _profile_rows(store, histogram_only.run_id)[("tensor", "transformer.wte.weight")]
    assert approx_row["method"] == "histogram"
    assert approx_row["top1pct_share"] == pytest.approx(_exact_top_share(wte), abs=0.005)
    assert approx_row["gini"] == pytest.approx(_exact_gini(wte), abs=0.003)
    with store.read() as con:
        trends = con.execute(
            "SELECT scope, pattern, n_layers FROM analysis_depth_trend WHERE run_id = ?",
            [outcome.run_id],
        ).fetchall()
    scopes = {s for s, _, _ in trends}
    assert {"model", "attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_down"} <= scopes
    assert all(n == 3 for _, _, n in trends)


def test_profile_depth_pattern_of_planted_trend(store, tmp_path):
    config = gpt2_config(n_layer=6, n_embd=16, n_head=4)
    model_dir = save_config_model(config, tmp_path / "gpt2")
    scores = random_scores(param_shapes(config), seed=1, kind="uniform")
    for name in scores:
        if ".h." in name:
            layer = int(name.split(".h.")[1].split(".")[0])
            scores[name] = scores[name] * (1.0 + layer)  # sensitivity grows with depth
    score_id = add_score_run(store, model_dir, scores)
    outcome = run_analyze(store, AnalyzeConfig("profile", runs=[score_id]), mlflow=False)
    with store.read() as con:
        pattern, slope = con.execute(
            "SELECT pattern, slope FROM analysis_depth_trend WHERE run_id = ? AND scope = 'model'",
            [outcome.run_id],
        ).fetchone()
    assert pattern == "increasing" and slope > 0


def test_profile_gqa_heads_counted_once(store, tmp_path):
    config = llama_gqa_config(n_layer=3, hidden=32, heads=4, kv=2)
    model_dir = save_config_model(config, tmp_path / "llama")
    scores = random_scores(param_shapes(config), seed=2)
    score_id = add_score_run(store, model_dir, scores)
    outcome = run_analyze(store, AnalyzeConfig("profile", runs=[score_id]), mlflow=False)
    rows = _profile_rows(store, outcome.run_id)
    hd = 8
    for layer in range(3):
        p = f"model.layers.{layer}.self_attn."
        kv_heads = {
            r["head"]
            for r in rows.values()
            if r["level"] == "head" and r["layer"] == layer and r["component"] == "attn_k"
        }
        q_heads = {
            r["head"]
            for r in rows.values()
            if r["level"] == "head" and r["layer"] == layer and r["component"] == "attn_q"
        }
        assert kv_heads == {0, 1} and q_heads == {0, 1, 2, 3}
        attn_n = sum(
            scores[p + m + ".weight"].numel() for m in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
        groups = [r for r in rows.values() if r["level"] == "kv_group" and r["layer"] == layer]
        assert len(groups) == 2 and sum(r["n"] for r in groups) == attn_n
        # kv group 1 = query heads 2 and 3 (q rows, o columns) + kv head 1 (k and v rows)
        parts = [
            scores[p + "q_proj.weight"][2 * hd : 4 * hd],
            scores[p + "o_proj.weight"][:, 2 * hd : 4 * hd],
            scores[p + "k_proj.weight"][hd : 2 * hd],
            scores[p + "v_proj.weight"][hd : 2 * hd],
        ]
        expected = sum(float(t.double().sum()) for t in parts)
        g1 = rows[("kv_group", f"layer={layer},kv_group=1")]
        assert g1["n"] == sum(t.numel() for t in parts)
        assert g1["mass"] == pytest.approx(expected, rel=1e-9)
        assert rows[("head", f"layer={layer},attn_q,head=3")]["kv_group"] == 1


def test_topk_counts_per_group_by_hand():
    import polars as pl

    from cwa.analysis.profile_topk import topk_counts

    ranked = pl.DataFrame(
        {
            "parameter": ["q1", "q1", "k1", "o1", "emb"],
            "layer": [1, 1, 1, 1, None],
            "component": ["attn_q", "attn_q", "attn_k", "attn_o", "embed"],
            "head": [3, 0, 1, 2, None],
        }
    )
    keys = [
        ("model", "all"),
        ("tensor", "q1"),
        ("layer", "layer=1"),
        ("component", "attn_q"),
        ("layer_component", "layer=1,attn_q"),
        ("head", "layer=1,attn_q,head=3"),
        ("kv_group", "layer=1,kv_group=1"),  # q heads 2, 3 (group size 2) and kv head 1
        ("kv_group", "layer=1,kv_group=0"),
        ("component", "embed"),
        ("layer", "layer=0"),
    ]
    rows = [{"level": level, "group_key": key} for level, key in keys]
    topk_counts(rows, ranked, group_size=2)
    got = {(r["level"], r["group_key"]): r["topk_count"] for r in rows}
    assert list(got.values()) == [5, 2, 4, 2, 2, 1, 3, 1, 1, 0]
    assert rows[0]["topk_share"] == 1.0 and rows[1]["topk_share"] == pytest.approx(0.4)
