"""The clusters analyzer core against independent computations: the sample against a brute-force
sort of every score, the features against the model's own parameters, the clustering and the
silhouette against scikit-learn run directly on an independently built feature matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cwa.analysis.cluster_sample import sample_weights
from cwa.analysis.clustering import ClusterOptions, cluster_weights
from cwa.errors import InvalidInput
from cwa.scorefile import write_score_file


@pytest.fixture(scope="module")
def tiny_model(tiny_world):
    from transformers import AutoModelForCausalLM

    from cwa.models.architecture import build_architecture_map

    model = AutoModelForCausalLM.from_pretrained(tiny_world["model"]).eval()
    return model, build_architecture_map(model)


def _score_files(tmp_path: Path, model, n_runs: int = 2) -> list[Path]:
    """Score files with structure: scores ~ |w| * lognormal noise, plus exact zeros and ties."""
    paths = []
    gen = torch.Generator().manual_seed(123)
    for run in range(n_runs):
        tensors = {}
        for name, param in model.named_parameters():
            noise = torch.exp(torch.randn(param.shape, generator=gen) * 1.5)
            score = param.detach().abs() * noise
            if "ln_" in name:
                score[: min(3, score.shape[0])] = 0.0  # exact zeros: log feature must be 0
            tensors[name] = score.float()
        # A tie at the top: the same large value in two tensors (earlier tensor must win).
        names = list(tensors)
        tensors[names[1]].view(-1)[5] = 1e3
        tensors[names[4]].view(-1)[0] = 1e3
        paths.append(write_score_file(tmp_path / f"scores{run}.safetensors", tensors))
    return paths


class _Weights:
    def __init__(self, model) -> None:
        self.params = dict(model.named_parameters())

    def get(self, name: str) -> torch.Tensor:
        return self.params[name].detach().float()


def _brute_force_top(model, path: Path, n: int) -> set[tuple[str, int]]:
    from safetensors import safe_open

    rows = []
    with safe_open(str(path), "pt") as f:
        for position, (name, _) in enumerate(model.named_parameters()):
            for flat, value in enumerate(f.get_tensor(name).reshape(-1).tolist()):
                rows.append((-value, position, flat, name))
    rows.sort()
    return {(name, flat) for _, _, flat, name in rows[:n]}


def test_sample_is_top_n_plus_seeded_uniform_and_never_exceeds(tiny_model, tmp_path) -> None:
    model, arch = tiny_model
    (path,) = _score_files(tmp_path, model, 1)
    names = list(arch.params)
    numels = [arch.params[n].numel for n in names]
    total = sum(numels)
    sample = sample_weights(path, names, numels, 50, 400, seed=7)
    pairs = set(zip(sample["parameter"].to_list(), sample["flat_index"].to_list(), strict=True))
    assert len(pairs) == sample.height  # no weight twice
    assert sample.height <= 50 + 400
    top = {
        (p, f) for p, f, t in sample.select("parameter", "flat_index", "in_top_n").iter_rows() if t
    }
    assert top == _brute_force_top(model, path, 50)
    # The uniform part is exactly random_k's seeded draw of 400 from the same tensors.
    from cwa.perturbation.scope import ScopeEntry
    from cwa.perturbation.selection import random_k

    drawn = random_k([ScopeEntry(n, c) for n, c in zip(names, numels, strict=True)], 400, 7)
    uniform = {(n, int(i)) for n, idx in drawn.items() for i in idx.tolist()}
    assert pairs == top | uniform
    assert sample.height == len(top | uniform)
    # Seeded: same seed same sample, another seed another sample.
    again = sample_weights(path, names, numels, 50, 400, seed=7)
    assert again.equals(sample)
    other = sample_weights(path, names, numels, 50, 400, seed=8)
    assert not other.equals(sample)
    # Asking for more than there is never exceeds the model (and never N + S).
    everything = sample_weights(path, names, numels, 100, total, seed=0)
    assert everything.height == total


def _independent_features(model, arch, sample, paths) -> np.ndarray:
    """Feature matrix built from the model's parameters and scores, without cwa.analysis."""
    from safetensors import safe_open

    from cwa.models.architecture import COMPONENTS

    params = dict(model.named_parameters())
    n_layers = model.config.n_layer
    rows = []
    comps = []
    for name, flat in zip(
        sample["parameter"].to_list(), sample["flat_index"].to_list(), strict=True
    ):
        w = float(params[name].detach().reshape(-1)[flat])
        info = arch.params[name]
        if info.layer is not None:
            depth = (info.layer + 0.5) / n_layers
        else:
            depth = 0.0 if "wte" in name or "wpe" in name else 1.0
        comps.append(COMPONENTS[int(arch.component_ids(name).reshape(-1)[flat])])
        rows.append([abs(w), depth])
    logs = []
    for path in paths:
        with safe_open(str(path), "pt") as f:
            raw = np.array(
                [
                    float(f.get_tensor(n).reshape(-1)[i])
                    for n, i in zip(sample["parameter"], sample["flat_index"], strict=True)
                ]
            )
        m = np.median(np.abs(raw[raw != 0]))
        logs.append(np.sign(raw) * np.log1p(np.abs(raw) / m))
    present = [c for c in COMPONENTS if c in comps]
    onehot = np.array([[1.0 if c == p else 0.0 for p in present] for c in comps])
    return np.column_stack([*logs, np.array(rows), onehot])


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm,extra",
    [("kmeans", {}), ("minibatch_kmeans", {}), ("dbscan", {"eps": 1.2, "min_samples": 4})],
)
def test_clusters_match_sklearn_on_the_same_features(
    tiny_model, tmp_path, algorithm, extra
) -> None:
    from sklearn.cluster import DBSCAN, KMeans, MiniBatchKMeans
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    model, arch = tiny_model
    paths = _score_files(tmp_path, model, 2)
    options = ClusterOptions(
        algorithm=algorithm, n_clusters=3, top_n=60, sample_size=500, seed=3, **extra
    )
    out = cluster_weights(paths, _Weights(model), arch, options)
    members = out["members"].sort(["parameter", "flat_index"])
    # Rebuild the features independently, in the order cluster_weights sampled them.
    sample = sample_weights(
        paths[0], list(arch.params), [i.numel for i in arch.params.values()], 60, 500, 3
    )
    x = StandardScaler().fit_transform(_independent_features(model, arch, sample, paths))
    if algorithm == "kmeans":
        ref = KMeans(n_clusters=3, n_init=10, random_state=3).fit(x)
    elif algorithm == "minibatch_kmeans":
        ref = MiniBatchKMeans(n_clusters=3, n_init=3, random_state=3, batch_size=1024).fit(x)
    else:
        ref = DBSCAN(eps=1.2, min_samples=4).fit(x)
    order = sample.with_row_index("i").sort(["parameter", "flat_index"])["i"].to_numpy()
    np.testing.assert_array_equal(members["cluster_id"].to_numpy(), ref.labels_[order])
    sizes = dict(zip(out["clusters"]["cluster_id"], out["clusters"]["size"], strict=True))
    labels, counts = np.unique(ref.labels_, return_counts=True)
    assert sizes == dict(zip(labels.tolist(), counts.tolist(), strict=True))
    keep = ref.labels_ != -1
    if len(set(ref.labels_[keep])) >= 2:
        expected = silhouette_score(x[keep], ref.labels_[keep])
        assert out["summary"]["silhouette"] == pytest.approx(expected, rel=1e-9)
    if algorithm == "kmeans":
        # Converged k-means centres are the means of their members in the clustering space.
        scaled = out["centroids"].pivot(on="feature", index="cluster_id", values="value_scaled")
        features = out["summary"]["features"]
        mine = scaled.sort("cluster_id").select(features).to_numpy()
        np.testing.assert_allclose(mine, ref.cluster_centers_, atol=1e-6)
    raw = out["centroids"].filter(feature="abs_weight").sort("cluster_id")
    for cluster_id, value in zip(raw["cluster_id"], raw["value"], strict=True):
        expected = members.filter(cluster_id=cluster_id)["abs_weight"].mean()
        assert value == pytest.approx(expected, rel=1e-12)
    assert out["summary"]["n_weights"] == members.height <= 60 + 500
    if algorithm == "kmeans":
        # The silhouette on a seeded subsample of 100 points, as documented.
        from dataclasses import replace

        small = cluster_weights(
            paths, _Weights(model), arch, replace(options, silhouette_sample=100)
        )
        pick = np.sort(np.random.default_rng(3).choice(len(x), size=100, replace=False))
        expected = silhouette_score(x[pick], ref.labels_[pick])
        assert small["summary"]["silhouette"] == pytest.approx(expected, rel=1e-9)


def test_bad_cluster_options_are_one_line_errors(tiny_model, tmp_path) -> None:
    model, arch = tiny_model
    paths = _score_files(tmp_path, model, 1)
    for options, text in [
        (ClusterOptions(algorithm="spectral"), "unknown clustering algorithm"),
        (ClusterOptions(n_clusters=1), "n_clusters >= 2"),
        (ClusterOptions(top_n=0, sample_size=0), "nothing to cluster"),
        (ClusterOptions(eps=0.0, algorithm="dbscan"), "eps must be > 0"),
        (ClusterOptions(n_clusters=50, top_n=10, sample_size=20), "exceeds the"),
    ]:
        with pytest.raises(InvalidInput, match=text):
            cluster_weights(paths, _Weights(model), arch, options)


def test_top_n_skips_nan_and_breaks_ties_like_rank(tiny_model, tmp_path) -> None:
    """NaN (not scored) never enters the top-N; ties go to the earlier tensor, then the lower
    flat index, exactly as `cwa rank` orders them (brute force over every score)."""
    model, arch = tiny_model
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for i, (name, param) in enumerate(model.named_parameters()):
        score = torch.rand(param.shape, generator=gen)
        if i == 0:
            score.view(-1)[::3] = float("nan")  # the first (largest) tensor is partly unscored
            score.view(-1)[1::7] = 0.999  # and has many ties at a high value
        if i == 5:
            score.view(-1)[:40] = 0.999  # ties in a later tensor lose to the earlier one
        tensors[name] = score
    path = write_score_file(tmp_path / "nan.safetensors", tensors)
    names = list(arch.params)
    numels = [arch.params[n].numel for n in names]
    sample = sample_weights(path, names, numels, 300, 0, seed=0)
    rows = []
    for position, name in enumerate(names):
        for flat, value in enumerate(tensors[name].reshape(-1).tolist()):
            if value == value:  # not NaN
                rows.append((-value, position, flat, name))
    rows.sort()
    expected = [(name, flat) for _, _, flat, name in rows[:300]]
    got = list(zip(sample["parameter"].to_list(), sample["flat_index"].to_list(), strict=True))
    assert sorted(got) == sorted(expected) and sample["in_top_n"].all()
