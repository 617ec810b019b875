"""``cwa analyze`` end to end through the CLI on the toy models (real score and rank runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _cli_checks import assert_one_line_error

pytestmark = pytest.mark.slow

SMALL = ("--n-samples", "8", "--seq-len", "32")


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _runs(store):
    with store.read() as con:
        return con.execute("SELECT run_id, stage, status FROM runs ORDER BY run_id").fetchall()


def _flat_scores(store, run_id):
    from cwa.scorefile import load_scores

    scores = load_scores(store.artifacts_dir(run_id) / "scores.safetensors")
    return np.concatenate([t.reshape(-1).numpy() for t in scores.values()]).astype(np.float64)


def test_stability_of_three_seeds_and_bad_inputs(cli, store, one_thread):
    ids = _ok(cli("score", "--model", "toy", "--seeds", "0,1,2", *SMALL, "-e", "seeds"))
    ids = ids.stdout.split()
    assert len(ids) == 3
    result = _ok(
        cli("--json", "analyze", "stability", "--experiment", "seeds", "--k-values", "20,1%")
    )
    doc = json.loads(result.stdout)
    analyze_id = doc["runs"][0]["run_id"]
    assert doc["runs"][0]["stage"] == "analyze"
    assert {t["title"] for t in doc["tables"]} >= {"global agreement (mean over pairs)"}
    with store.read() as con:
        rows = con.execute(
            "SELECT run_a, run_b, overlap, jaccard FROM analysis_stability "
            "WHERE run_id = ? AND scope = 'global' AND k = 20",
            [analyze_id],
        ).fetchall()
        parents = con.execute(
            "SELECT parent_run_id FROM run_parents WHERE run_id = ? ORDER BY 1", [analyze_id]
        ).fetchall()
    assert [p for (p,) in parents] == sorted(ids)
    assert len(rows) == 3
    flats = {run_id: _flat_scores(store, run_id) for run_id in ids}
    for run_a, run_b, overlap, jaccard in rows:
        # score files hold the parameters in architecture order, as the analyzer ranks them
        a, b = flats[run_a], flats[run_b]
        top_a = np.lexsort((np.arange(a.size), -a))[:20]
        top_b = np.lexsort((np.arange(b.size), -b))[:20]
        expected = len(set(top_a) & set(top_b))
        assert overlap == expected and jaccard == pytest.approx(expected / (40 - expected))

    rank_id = _ok(cli("rank", ids[0], "--topk", "30")).stdout.split()[0]
    before = _runs(store)
    assert_one_line_error(cli("analyze", "stability", ids[0]), "needs at least 2 score runs, got 1")
    assert_one_line_error(cli("analyze", "stability", ids[0], rank_id), "is a rank run")
    assert_one_line_error(
        cli("analyze", "stability", *ids[:2], "--k-values", "100000000"), "larger than the ranking"
    )
    assert_one_line_error(cli("analyze", "stabilty", *ids[:2]), "did you mean 'stability'")
    assert_one_line_error(cli("analyze", "profile", ids[0], "-o", "nope=1"), "has no option 'nope'")
    assert_one_line_error(cli("analyze", "profile", ids[0], "--k", "3"), "has no option 'k'")
    assert _runs(store) == before


def test_correlation_of_two_metrics(cli, store, one_thread):
    a = _ok(cli("score", "--model", "toy", "--metric", "grad_x_weight", *SMALL)).stdout.split()[0]
    b = _ok(cli("score", "--model", "toy", "--metric", "magnitude", *SMALL)).stdout.split()[0]
    result = _ok(cli("analyze", "correlation", a, b, "--k", "50"))
    analyze_id = result.stdout.split()[0]
    with store.read() as con:
        agreement = dict(
            con.execute(
                "SELECT statistic, value FROM analysis_metric_agreement WHERE run_id = ? "
                "AND metric_a = 'grad_x_weight' AND metric_b = 'magnitude'",
                [analyze_id],
            ).fetchall()
        )
    va, vb = _flat_scores(store, a), _flat_scores(store, b)
    top = len(set(np.argsort(-va, kind="stable")[:50]) & set(np.argsort(-vb, kind="stable")[:50]))
    assert agreement["topk_overlap"] == pytest.approx(top / 50)
    assert -1 <= agreement["spearman"] <= 1 and -1 <= agreement["kendall"] <= 1


def test_profile_gqa_toy_llama_with_rank_run(cli, store, one_thread):
    from cwa.analysis.archmap import architecture_for_run
    from cwa.store.runs import fetch_run

    score_id = _ok(cli("score", "--model", "toy-llama", *SMALL)).stdout.split()[0]
    _ok(cli("rank", score_id, "--topk", "40"))
    analyze_id = _ok(cli("analyze", "profile", score_id)).stdout.split()[0]
    with store.read() as con:
        arch = architecture_for_run(fetch_run(con, score_id))
        groups = con.execute(
            "SELECT layer, kv_group, n FROM analysis_profile WHERE run_id = ? "
            "AND level = 'kv_group' ORDER BY layer, kv_group",
            [analyze_id],
        ).fetchall()
        model_topk = con.execute(
            "SELECT topk_count FROM analysis_profile WHERE run_id = ? AND level = 'model'",
            [analyze_id],
        ).fetchone()[0]
        per_layer = con.execute(
            "SELECT layer, topk_count FROM analysis_profile WHERE run_id = ? AND level = 'layer'",
            [analyze_id],
        ).fetchall()
        ranked = dict(
            con.execute(
                "SELECT layer, count(*) FROM ranked_weights w JOIN runs r ON r.run_id = w.run_id "
                "WHERE r.stage = 'rank' AND layer IS NOT NULL GROUP BY layer"
            ).fetchall()
        )
    assert arch.n_heads == 4 and arch.n_kv_heads == 2
    assert [(layer, g) for layer, g, _ in groups] == [
        (layer, g) for layer in range(arch.n_layers) for g in range(2)
    ]
    for layer in range(arch.n_layers):
        attn = sum(
            info.numel
            for info in arch.params.values()
            if info.layer == layer
            and info.components[0] in ("attn_q", "attn_k", "attn_v", "attn_o")
        )
        assert sum(n for lay, _, n in groups if lay == layer) == attn  # each weight once
    assert model_topk == 40
    assert {layer: count for layer, count in per_layer if count} == ranked
