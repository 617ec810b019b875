"""Core of the ``clusters`` analyzer: group weights by their sensitivity pattern.

Clustering never sees every scalar of a model. The weights clustered are the union of

* the global top-N of the first score run (a streaming merge of per-tensor top-N, the same
  exact ordering as ``cwa rank``), and
* a seeded uniform sample of ``sample_size`` weights from the same tensors (drawn with
  :func:`cwa.perturbation.selection.random_k`, without replacement),

so at most ``top_n + sample_size`` weights (overlaps are counted once). Every file (each score
run, the checkpoint) is read once, tensor by tensor in lockstep (:func:`gather_sample`), and each
sampled weight gets the features (sampling and the pass: :mod:`cwa.analysis.cluster_sample`):

* ``log_score[i]`` for score run i: ``sign(s) * log1p(|s| / m_i)``, with ``m_i`` the median of
  the nonzero |scores| of run i over the sample. This is a log scale that needs no epsilon for
  exact zeros (they map to 0) and keeps the sign of metrics that can be negative (Hutchinson);
  dividing by ``m_i`` makes runs of different metrics comparable.
* ``abs_weight``: |w| from the checkpoint (:mod:`cwa.analysis.model_weights`).
* ``depth``: ``(layer + 0.5) / n_layers`` in (0, 1); tensors outside the layer stack sit at 0
  (embeddings) or 1 (final norm, lm_head).
* ``component=<name>``: one-hot of the element's component (fused tensors are split per element
  by the architecture map), one column per component present in the sample.

With ``standardize`` (default) every column is z-scored before clustering, so no feature
dominates by its units; centroids are reported both as raw feature means of the members and in
the clustering space. Algorithms (scikit-learn): ``kmeans`` (``KMeans``, ``n_init=10``),
``minibatch_kmeans`` (``MiniBatchKMeans``) and ``dbscan`` (``DBSCAN``; label -1 is noise,
stored as cluster -1 and left out of the silhouette). The silhouette (Euclidean, clustering
space) is computed on at most ``silhouette_sample`` points drawn with the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwa.errors import InvalidInput

ALGORITHMS = ("kmeans", "minibatch_kmeans", "dbscan")


@dataclass
class ClusterOptions:
    algorithm: str = "kmeans"
    n_clusters: int = 4
    top_n: int = 1000
    sample_size: int = 5000
    seed: int = 0
    eps: float = 0.5  # DBSCAN neighbourhood radius (clustering space)
    min_samples: int = 5  # DBSCAN core-point threshold
    standardize: bool = True
    silhouette_sample: int = 2000

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise InvalidInput(
                f"unknown clustering algorithm {self.algorithm!r}; use one of "
                f"{', '.join(ALGORITHMS)}"
            )
        for name in ("n_clusters", "min_samples", "silhouette_sample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"clusters option {name} must be a whole number >= 1")
        if self.algorithm != "dbscan" and self.n_clusters < 2:
            raise InvalidInput("clusters needs n_clusters >= 2 (one cluster says nothing)")
        for name in ("top_n", "sample_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"clusters option {name} must be a whole number >= 0")
        if self.top_n + self.sample_size == 0:
            raise InvalidInput("clusters needs top_n or sample_size > 0 (nothing to cluster)")
        if not self.eps > 0:
            raise InvalidInput(f"clusters option eps must be > 0, got {self.eps}")


def add_features(frame: Any, n_runs: int, with_weights: bool) -> tuple[Any, list[str]]:
    """The clustering features (see the module docstring) added to a :func:`gather_sample`
    frame; returns (frame, feature column names)."""
    import numpy as np
    import polars as pl

    from cwa.models.architecture import COMPONENTS

    features: list[str] = []
    log_cols = []
    for i in range(n_runs):
        raw = frame[f"score_{i}"].to_numpy()
        if not np.isfinite(raw).all():
            raise InvalidInput(
                f"score run {i + 1} has non-finite scores among the sampled weights; re-score"
            )
        nonzero = np.abs(raw[raw != 0])
        scale = float(np.median(nonzero)) if nonzero.size else 1.0
        log_cols.append(pl.Series(f"log_score_{i}", np.sign(raw) * np.log1p(np.abs(raw) / scale)))
        features.append(f"log_score_{i}")
    frame = frame.with_columns(log_cols)
    features += ["abs_weight", "depth"] if with_weights else ["depth"]
    present = [c for c in COMPONENTS if c in set(frame["component"].to_list())]
    frame = frame.with_columns(
        [(pl.col("component") == c).cast(pl.Float64).alias(f"component={c}") for c in present]
    )
    features += [f"component={c}" for c in present]
    return frame, features


def feature_matrix(frame: Any, features: Sequence[str], standardize: bool) -> Any:
    """The clustering matrix: the feature columns, z-scored per column when ``standardize``
    (a constant column becomes 0)."""
    import numpy as np

    matrix = frame.select(features).to_numpy().astype(np.float64)
    if standardize:
        mean = matrix.mean(axis=0)
        std = matrix.std(axis=0)
        matrix = (matrix - mean) / np.where(std > 0, std, 1.0)
    return matrix


def fit_clusters(matrix: Any, options: ClusterOptions) -> tuple[Any, dict[str, Any]]:
    """Cluster labels (numpy int array) and fit details for the matrix."""
    from sklearn.cluster import DBSCAN, KMeans, MiniBatchKMeans

    n = matrix.shape[0]
    if options.algorithm in ("kmeans", "minibatch_kmeans") and options.n_clusters > n:
        raise InvalidInput(
            f"n_clusters={options.n_clusters} exceeds the {n} sampled weights; lower it or "
            "raise top_n / sample_size"
        )
    if options.algorithm == "kmeans":
        model = KMeans(n_clusters=options.n_clusters, n_init=10, random_state=options.seed)
        labels = model.fit_predict(matrix)
        return labels, {"inertia": float(model.inertia_), "n_iter": int(model.n_iter_)}
    if options.algorithm == "minibatch_kmeans":
        model = MiniBatchKMeans(
            n_clusters=options.n_clusters, n_init=3, random_state=options.seed, batch_size=1024
        )
        labels = model.fit_predict(matrix)
        return labels, {"inertia": float(model.inertia_), "n_iter": int(model.n_iter_)}
    model = DBSCAN(eps=options.eps, min_samples=options.min_samples)
    labels = model.fit_predict(matrix)
    return labels, {"n_noise": int((labels == -1).sum())}


def silhouette(matrix: Any, labels: Any, sample: int, seed: int) -> tuple[float | None, Any]:
    """(overall silhouette, per-point silhouette or None) on the non-noise points, computed on
    a seeded subsample of at most ``sample`` points; None when fewer than 2 clusters remain."""
    import numpy as np
    from sklearn.metrics import silhouette_samples

    keep = np.flatnonzero(labels != -1)
    if keep.size > sample:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=sample, replace=False))
    n_labels = np.unique(labels[keep]).size
    if n_labels < 2 or n_labels >= keep.size:
        return None, None
    values = silhouette_samples(matrix[keep], labels[keep])
    per_point = np.full(labels.shape[0], np.nan)
    per_point[keep] = values
    return float(values.mean()), per_point


def cluster_weights(
    score_paths: Sequence[Path], weights: Any, arch: Any, options: ClusterOptions
) -> dict[str, Any]:
    """Sample, featurise and cluster (see the module docstring).

    Returns ``{"clusters", "centroids", "members"}`` polars frames and ``"summary"`` (dict).
    """
    import numpy as np
    import polars as pl

    options.validate()
    from cwa.analysis.cluster_sample import common_tensors, gather_sample

    names = common_tensors(score_paths, arch)
    numels = [arch.params[n].numel for n in names]
    sample = gather_sample(
        score_paths, names, numels, options.top_n, options.sample_size, options.seed,
        arch=arch, weights=weights,
    )  # fmt: skip
    frame, features = add_features(sample, len(score_paths), weights is not None)
    matrix = feature_matrix(frame, features, options.standardize)
    labels, fit = fit_clusters(matrix, options)
    overall, per_point = silhouette(matrix, labels, options.silhouette_sample, options.seed)
    frame = frame.with_columns(
        pl.Series("cluster_id", labels.astype(np.int64)),
        pl.Series(
            "silhouette", per_point if per_point is not None else np.full(len(labels), np.nan)
        ),
    ).with_columns(pl.col("silhouette").fill_nan(None))
    clusters = (
        frame.group_by("cluster_id")
        .agg(
            pl.len().alias("size"),
            pl.col("in_top_n").sum().alias("n_top"),
            pl.col("silhouette").mean().alias("silhouette"),
            pl.col("score_0").mean().alias("mean_score"),
            pl.col("abs_weight").fill_nan(None).mean().alias("mean_abs_weight"),
            pl.col("depth").mean().alias("mean_depth"),
            pl.col("component").mode().sort().first().alias("top_component"),
            pl.col("layer").mode().sort().first().alias("top_layer"),
        )
        .with_columns((pl.col("cluster_id") == -1).alias("is_noise"))
        .sort("cluster_id")
    )
    scaled = pl.DataFrame(matrix, schema=features, orient="row").with_columns(
        pl.Series("cluster_id", labels.astype(np.int64))
    )
    raw_means = frame.group_by("cluster_id").agg([pl.col(f).mean() for f in features])
    scaled_means = scaled.group_by("cluster_id").agg([pl.col(f).mean() for f in features])
    centroids = (
        raw_means.unpivot(index="cluster_id", variable_name="feature", value_name="value")
        .join(
            scaled_means.unpivot(
                index="cluster_id", variable_name="feature", value_name="value_scaled"
            ),
            on=["cluster_id", "feature"],
        )
        .sort(["cluster_id", "feature"])
    )
    members = frame.select(
        "cluster_id",
        "parameter",
        "flat_index",
        "layer",
        "component",
        "in_top_n",
        pl.col("score_0").alias("score"),
        pl.col("abs_weight").fill_nan(None),
    ).sort(["cluster_id", "parameter", "flat_index"])
    summary = {
        "n_weights": int(frame.height),
        "n_top": int(frame["in_top_n"].sum()),
        "n_clusters": int(np.unique(labels[labels != -1]).size),
        "silhouette": overall,
        "features": features,
        "tensors": len(names),
        **fit,
    }
    return {"clusters": clusters, "centroids": centroids, "members": members, "summary": summary}
