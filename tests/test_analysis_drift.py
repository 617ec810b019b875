"""drift: histogram KS / Wasserstein vs brute force and scipy; a planted moved tensor."""

from __future__ import annotations

import numpy as np
import pytest
from _analysis_world import (
    add_score_run,
    gpt2_config,
    param_shapes,
    random_scores,
    save_config_model,
)
from scipy import stats

from cwa.analysis.drift import (
    PERCENTILES,
    _hist,
    ks_from_histograms,
    wasserstein_from_histograms,
)
from cwa.analysis.histogram import bin_keys
from cwa.stages.analyze import AnalyzeConfig, run_analyze


def test_ks_and_wasserstein_against_brute_force_and_scipy():
    rng = np.random.default_rng(4)
    a = np.exp(rng.normal(0, 1.5, 40_000)).astype(np.float32)
    b = np.exp(rng.normal(0.3, 1.2, 30_000)).astype(np.float32)
    ha, hb = _hist(a), _hist(b)
    ks = ks_from_histograms(ha, hb)
    # brute force at the same bin edges: fraction of values below each edge
    keys = np.union1d(bin_keys(a), bin_keys(b))
    edges = ((keys + 1) << 16).astype(np.int32).view(np.float32)
    fa = np.searchsorted(np.sort(a), edges, side="left") / a.size
    fb = np.searchsorted(np.sort(b), edges, side="left") / b.size
    assert ks == pytest.approx(np.max(np.abs(fa - fb)), abs=1e-12)
    exact = stats.ks_2samp(a, b).statistic
    assert ks <= exact + 1e-12 and ks == pytest.approx(exact, abs=0.01)
    w = wasserstein_from_histograms(ha, hb)
    qa = np.quantile(a.astype(np.float64), PERCENTILES)
    qb = np.quantile(b.astype(np.float64), PERCENTILES)
    assert w == pytest.approx(np.mean(np.abs(qa - qb)), rel=0.01)
    assert ks_from_histograms(ha, _hist(a.copy())) == 0.0


def test_drift_ranks_the_planted_tensor_first(store, tmp_path):
    config = gpt2_config(n_layer=2, n_embd=16, n_head=4)
    model_dir = save_config_model(config, tmp_path / "gpt2")
    shapes = param_shapes(config)
    base = random_scores(shapes, seed=1)
    moved_name = "transformer.h.1.mlp.c_fc.weight"
    tuned = dict(base)
    tuned[moved_name] = random_scores({moved_name: shapes[moved_name]}, seed=9)[moved_name] * 3
    tuned["transformer.h.0.attn.c_proj.weight"] = base["transformer.h.0.attn.c_proj.weight"] * 2
    run_a = add_score_run(store, model_dir, base, seed=0)
    run_b = add_score_run(store, model_dir, tuned, seed=1)
    outcome = run_analyze(
        store, AnalyzeConfig("drift", runs=[run_a, run_b], options={"k": "20"}), mlflow=False
    )
    with store.read() as con:
        rows = con.execute(
            "SELECT parameter, drift_rank, topk_overlap, ks, moved, share_a FROM analysis_drift "
            "WHERE run_id = ? ORDER BY drift_rank NULLS FIRST",
            [outcome.run_id],
        ).fetchall()
        view = con.execute(
            "SELECT parameter FROM analysis_drifted_tensors WHERE run_id = ? AND moved",
            [outcome.run_id],
        ).fetchall()
    by_name = {r[0]: r for r in rows}
    assert rows[1][0] == moved_name and rows[1][1] == 1
    va, vb = base[moved_name].reshape(-1).numpy(), tuned[moved_name].reshape(-1).numpy()
    top_a = set(np.argsort(-va)[:20].tolist())
    top_b = set(np.argsort(-vb)[:20].tolist())
    assert by_name[moved_name][2] == pytest.approx(len(top_a & top_b) / 20)
    assert by_name[moved_name][4] is True
    # scaling keeps the top-k but shifts the distribution: KS catches it
    scaled = by_name["transformer.h.0.attn.c_proj.weight"]
    assert scaled[2] == 1.0 and scaled[3] > 0.1 and scaled[4] is True
    unchanged = by_name["transformer.h.0.mlp.c_fc.weight"]
    assert unchanged[2] == 1.0 and unchanged[3] == 0.0 and unchanged[4] is False
    assert set(view) == {(moved_name,), ("transformer.h.0.attn.c_proj.weight",)}
    total = sum(float(t.double().abs().sum()) for t in base.values())
    wte = float(base["transformer.wte.weight"].double().sum())
    assert by_name["transformer.wte.weight"][5] == pytest.approx(wte / total, rel=1e-9)
    assert outcome.metrics["n_moved"] == 2.0
