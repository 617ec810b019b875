"""End to end through the CLI: score -> rank -> analyze clusters -> perturb the cluster against
matched random_k controls -> analyze effects, on the toy model, checked against scikit-learn,
scipy and the stored perturbation results; and the bad inputs of clusters, cluster:ID and effects
(one-line errors, nothing registered)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _analysis_world import gpt2_config, run_count, save_config_model
from _store_access import store_rows

from cwa.store import Store


def _ok(result) -> dict:
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def _run_id(result) -> str:
    return _ok(result)["runs"][0]["run_id"]


def _sklearn_labels(model_dir, score_path, members, n_clusters: int, seed: int):
    """Cluster labels and silhouette from scikit-learn on features rebuilt independently."""
    from safetensors import safe_open
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModelForCausalLM

    from cwa.models.architecture import COMPONENTS, build_architecture_map

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    arch = build_architecture_map(model)
    params = dict(model.named_parameters())
    order = {name: i for i, name in enumerate(params)}
    members = sorted(members, key=lambda m: (order[m[0]], m[1]))  # the order clustered in
    n_layers = model.config.n_layer
    with safe_open(str(score_path), "pt") as f:
        raw = np.array([float(f.get_tensor(n).reshape(-1)[i]) for n, i, _ in members])
    scale = np.median(np.abs(raw[raw != 0]))
    rows, comps = [], []
    for name, flat, _ in members:
        info = arch.params[name]
        depth = (
            (info.layer + 0.5) / n_layers
            if info.layer is not None
            else (0.0 if "wte" in name or "wpe" in name else 1.0)
        )
        rows.append([abs(float(params[name].detach().reshape(-1)[flat])), depth])
        comps.append(COMPONENTS[int(arch.component_ids(name).reshape(-1)[flat])])
    present = [c for c in COMPONENTS if c in comps]
    x = np.column_stack(
        [np.sign(raw) * np.log1p(np.abs(raw) / scale), np.array(rows),
         np.array([[float(c == p) for p in present] for c in comps])]
    )  # fmt: skip
    x = StandardScaler().fit_transform(x)
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(x)
    return members, km.labels_, silhouette_score(x, km.labels_)


@pytest.mark.slow
def test_clusters_then_clustered_perturbation_then_effects(
    cli, toy_model_path, store_path, one_thread
) -> None:
    from scipy import stats

    score_id = _run_id(
        cli("--json", "score", "--model", "toy", "--n-samples", "8", "--seq-len", "32",
            "--batch-size", "4")
    )  # fmt: skip
    rank_id = _run_id(cli("--json", "rank", score_id, "--topk", "200"))
    clusters_id = _run_id(
        cli("--json", "analyze", "clusters", score_id, "-o", "top_n=200", "-o",
            "sample_size=2000", "-o", "n_clusters=4", "-o", "seed=0",
            "-o", "silhouette_sample=5000")
    )  # fmt: skip
    members = store_rows(
        store_path,
        "SELECT parameter, flat_index, cluster_id FROM analysis_cluster_members WHERE run_id = ?",
        [clusters_id],
    )
    assert 200 <= len(members) <= 200 + 2000
    sizes = dict(
        store_rows(store_path, "SELECT cluster_id, size FROM analysis_clusters WHERE run_id = ?",
              [clusters_id])
    )  # fmt: skip
    assert sum(sizes.values()) == len(members)
    ordered, labels, silhouette = _sklearn_labels(
        toy_model_path, store_path / "artifacts" / score_id / "scores.safetensors", members, 4, 0
    )
    assert [m[2] for m in ordered] == labels.tolist()
    ((stored_silhouette,),) = store_rows(
        store_path,
        "SELECT value FROM run_metrics WHERE run_id = ? AND name = 'silhouette'",
        [clusters_id],
    )
    assert stored_silhouette == pytest.approx(silhouette, rel=1e-9)

    # Perturb the smallest cluster (keeps the sweep short) against matched random_k controls.
    cluster_id = min(sizes, key=sizes.get)
    perturb_id = _run_id(
        cli("--json", "perturb", rank_id, "--treatment", f"cluster:{cluster_id}",
            "--controls", "random_k", "--seeds", "0,1,2", "--method", "zero",
            "--eval", "perplexity,lambada", "--limit", "10")
    )  # fmt: skip
    conditions = store_rows(
        store_path,
        "SELECT selection, k, seed, n_changed, scope, role FROM perturbation_conditions "
        "WHERE run_id = ? ORDER BY selection, seed",
        [perturb_id],
    )
    assert [c[0] for c in conditions] == [f"cluster:{cluster_id}"] + ["random_k"] * 3
    assert {c[1] for c in conditions} == {sizes[cluster_id]}  # same count
    assert len({c[4] for c in conditions}) == 1  # same scope
    assert conditions[0][5] == "treatment" and {c[5] for c in conditions[1:]} == {"control"}
    assert all(c[3] == c[1] for c in conditions)  # zeroing changed every selected weight
    assert (clusters_id, "clusters") in store_rows(
        store_path, "SELECT parent_run_id, role FROM run_parents WHERE run_id = ?", [perturb_id]
    )
    effects = store_rows(
        store_path,
        "SELECT selection, value, baseline, delta FROM perturbation_effects "
        "WHERE run_id = ? AND task = 'perplexity' AND metric = 'perplexity' "
        "ORDER BY selection, seed",
        [perturb_id],
    )
    treated = effects[0]
    controls = np.array([e[1] for e in effects[1:]])
    ((view_k, damage, control_delta, n_control),) = store_rows(
        store_path,
        "SELECT k, damage_per_weight, control_delta, n_control FROM cluster_perturbation_damage "
        "WHERE perturb_run_id = ? AND task = 'perplexity' AND metric = 'perplexity'",
        [perturb_id],
    )
    assert view_k == sizes[cluster_id] and n_control == 3
    assert damage == pytest.approx(treated[3] / view_k)
    assert control_delta == pytest.approx(np.mean([e[3] for e in effects[1:]]))

    effects_id = _run_id(cli("--json", "analyze", "effects", perturb_id))
    ((difference, ratio, low, high, z),) = store_rows(
        store_path,
        "SELECT difference, ratio, ci_low, ci_high, z FROM analysis_effects WHERE run_id = ? "
        "AND task = 'perplexity' AND metric = 'perplexity' AND control = 'random_k'",
        [effects_id],
    )
    assert difference == pytest.approx(treated[1] - controls.mean())
    assert ratio == pytest.approx(treated[1] / controls.mean())
    ci = stats.ttest_1samp(controls, popmean=0).confidence_interval(0.95)
    assert (low, high) == pytest.approx((treated[1] - ci.high, treated[1] - ci.low))
    assert z == pytest.approx((treated[1] - controls.mean()) / controls.std(ddof=1))
    # Flipped items (per-item records of lambada): brute force over evaluation_items.
    items = store_rows(
        store_path,
        "SELECT condition_id, item_index, acc FROM evaluation_items WHERE run_id = ? "
        "AND task = 'lambada'",
        [perturb_id],
    )
    base = {i: acc for c, i, acc in items if c is None}
    assert len(base) == 10
    flips = store_rows(
        store_path,
        "SELECT condition_id, n_items, n_flipped, correct_to_wrong, wrong_to_correct FROM "
        "analysis_effect_flips WHERE run_id = ? AND task = 'lambada'",
        [effects_id],
    )
    assert len(flips) == 4  # the cluster and three random_k seeds
    for condition_id, n_items, n_flipped, c2w, w2c in flips:
        mine = [(i, acc) for c, i, acc in items if c == condition_id]
        assert n_items == len(mine) == 10
        assert n_flipped == sum(acc != base[i] for i, acc in mine)
        assert c2w == sum(base[i] > 0 and acc == 0 for i, acc in mine)
        assert w2c == sum(base[i] == 0 and acc > 0 for i, acc in mine)
    listed = set(
        store_rows(
            store_path,
            "SELECT condition_id, item_index FROM analysis_flipped_items WHERE run_id = ? "
            "AND task = 'lambada'",
            [effects_id],
        )
    )
    # For LAMBADA prediction = greedy = acc, so issue 9's flipped_items view lists the same.
    assert listed == set(
        store_rows(
            store_path,
            "SELECT condition_id, item_index FROM flipped_items WHERE run_id = ? "
            "AND task = 'lambada'",
            [perturb_id],
        )
    )


@pytest.fixture
def tiny_chain(cli, tiny_world, store_path) -> dict:
    score_id = _run_id(
        cli("--json", "score", "--model", str(tiny_world["model"]), "--data",
            str(tiny_world["text"]), "--n-samples", "8", "--seq-len", "16", "--batch-size", "4")
    )  # fmt: skip
    rank_id = _run_id(cli("--json", "rank", score_id, "--topk", "50"))
    return {"score": score_id, "rank": rank_id}


@pytest.mark.slow
def test_bad_cluster_inputs_register_nothing(cli, tiny_chain, tiny_world, store_path) -> None:
    store = Store(store_path)
    score_id, rank_id = tiny_chain["score"], tiny_chain["rank"]
    text = f"perplexity:{tiny_world['text']}"
    perturb = ("perturb", rank_id, "--controls", "random_k", "--eval", text)
    before = run_count(store)
    # No clusters analysis yet: cluster:ID has nothing to refer to.
    cases = [((*perturb, "--treatment", "cluster:0"), "no clusters analysis of score run")]
    for args, text in cases:
        result = cli(*args)
        assert result.exit_code != 0 and text in result.stderr, result.stderr
        assert run_count(store) == before
    clusters_id = _run_id(
        cli("--json", "analyze", "clusters", score_id, "-o", "top_n=20", "-o", "sample_size=300",
            "-o", "n_clusters=3", "-o", "algorithm=minibatch_kmeans")
    )  # fmt: skip
    before = run_count(store)
    cases = [
        ((*perturb, "--treatment", "cluster:7"), "has no cluster 7; its clusters are 0, 1, 2"),
        ((*perturb, "--treatment", "cluster:x"), "whole-number ID"),
        ((*perturb, "--treatment", "cluster:0", "--k-values", "5,10"), "drop --k-values"),
        ((*perturb, "--treatment", "cluster"), "needs a cluster id"),
        ((*perturb, "--treatment", f"cluster:{rank_id}/0"), "is a rank run, but"),
        ((*perturb, "--treatment", "cluster:0", "--components", "attn_q"), "outside the layers"),
        (("analyze", "clusters", rank_id), "takes score runs"),
        (("analyze", "clusters", score_id, "-o", "algorithm=spectral"), "use one of"),
        (("analyze", "clusters", score_id, "-o", "n_clusters=1"), "at least 2"),
        (("analyze", "clusters", score_id, "-o", "n_clusters=500", "-o", "top_n=10",
          "-o", "sample_size=10"), "exceeds the at most 20 weights"),
        (("analyze", "clusters", score_id, "-o", "clusters=3"), "no option 'clusters'"),
        (("analyze", "clusters", score_id, "--verify"), "no option 'verify'"),
        (("analyze", "effects", score_id), "takes perturb runs"),
        (("analyze", "effects", rank_id), "takes perturb runs"),
    ]  # fmt: skip
    for args, text in cases:
        result = cli(*args)
        assert result.exit_code != 0, args
        assert text in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert run_count(store) == before, args
    # A cluster id from the stored analysis works through the named-run form too.
    ok = cli("--json", *perturb, "--treatment", f"cluster:{clusters_id[:12]}/0", "--limit", "4")
    assert _run_id(ok)


def test_clusters_without_weights_needs_use_weights_false(cli, store, tmp_path) -> None:
    from _analysis_world import add_score_run, param_shapes, random_scores

    folder = save_config_model(gpt2_config(), tmp_path / "config_only")  # no weight files
    shapes = param_shapes(gpt2_config())
    score_id = add_score_run(store, folder, random_scores(shapes, 0))
    second = add_score_run(store, folder, random_scores(shapes, 1, kind="uniform"), seed=1)
    before = run_count(store)
    result = cli("analyze", "clusters", score_id, "-o", "sample_size=300", "-o", "top_n=10")
    assert result.exit_code == 1 and "not available locally" in result.stderr
    assert run_count(store) == before
    out = _ok(
        cli("--json", "analyze", "clusters", score_id, second, "-o", "sample_size=300",
            "-o", "top_n=10", "-o", "use_weights=false", "-o", "n_clusters=3")
    )  # fmt: skip
    run_id = out["runs"][0]["run_id"]
    with store.read() as con:
        features = con.execute(
            "SELECT DISTINCT feature FROM analysis_cluster_centroids WHERE run_id = ?", [run_id]
        ).fetchall()
        n, nulls = con.execute(
            "SELECT count(*), count(*) FILTER (abs_weight IS NULL) FROM analysis_cluster_members "
            "WHERE run_id = ?",
            [run_id],
        ).fetchone()
    assert ("abs_weight",) not in features and ("depth",) in features
    assert {("log_score_0",), ("log_score_1",)} <= set(features)  # one per score run
    assert 0 < n <= 310 and nulls == n
