"""The ``clusters`` analyzer: groups of weights with alike sensitivity patterns.

Input: one or more score runs of one model (the first one's top-N and sample define the weights;
every run contributes a log-score feature). The computation is in :mod:`cwa.analysis.clustering`;
|w| comes from the checkpoint through :mod:`cwa.analysis.model_weights` (``use_weights=false``
clusters on scores, depth and component only, for a model whose weights are not at hand).

Tables (migration 0008): ``analysis_clusters`` (one row per cluster: size, silhouette, means,
dominant component and layer), ``analysis_cluster_centroids`` (long form: cluster, feature, raw
mean, mean in the clustering space) and ``analysis_cluster_members`` (every clustered weight:
parameter, flat index, layer, component, score, |w|). A cluster is perturbed against matched
controls with ``cwa perturb RANK_RUN --treatment cluster:ID`` (see
:mod:`cwa.analysis.cluster_selection`).
"""

from __future__ import annotations

from typing import Any

from cwa.analysis.base import AnalysisResult, AnalyzerOption, AnalyzerSpec, DisplayTable
from cwa.errors import InvalidInput

NAME = "clusters"
DESCRIPTION = "k-means / MiniBatchKMeans / DBSCAN clusters of weights by sensitivity pattern"


def _options(options: dict[str, Any]) -> Any:
    from cwa.analysis.clustering import ClusterOptions

    return ClusterOptions(
        algorithm=options["algorithm"],
        n_clusters=options["n_clusters"],
        top_n=options["top_n"],
        sample_size=options["sample_size"],
        seed=options["seed"],
        eps=options["eps"],
        min_samples=options["min_samples"],
        standardize=options["standardize"],
        silhouette_sample=options["silhouette_sample"],
    )


def _validate(inputs: Any, options: dict[str, Any]) -> None:
    from cwa.analysis.model_weights import weights_available

    _options(options).validate()
    headers = [inputs.score_header(run) for run in inputs.runs]
    common = set(headers[0]).intersection(*headers[1:])
    if not common:
        raise InvalidInput("the score runs share no scored tensor; cluster runs of one model")
    n_weights = sum(_numel(headers[0][name]) for name in common)
    cap = min(options["top_n"] + options["sample_size"], n_weights)
    if options["algorithm"] != "dbscan" and options["n_clusters"] > cap:
        raise InvalidInput(
            f"n_clusters={options['n_clusters']} exceeds the at most {cap} weights clustered; "
            "lower n_clusters or raise top_n / sample_size"
        )
    run = inputs.runs[0]
    if options["use_weights"] and not weights_available(str(run.model_ref)):
        raise InvalidInput(
            f"the weights of model {run.model_ref!r} are not available locally (needed for the "
            "|w| feature); pass a local model folder, or -o use_weights=false"
        )


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for dim in shape:
        out *= int(dim)
    return out


class _NoWeights:
    """Stands in for the checkpoint when ``use_weights`` is off: |w| is left out."""

    def get(self, name: str) -> Any:  # pragma: no cover - never called without the feature
        raise InvalidInput("weights are not used in this analysis")


def _run(inputs: Any, options: dict[str, Any], reporter: Any) -> AnalysisResult:
    import polars as pl

    from cwa.analysis.clustering import cluster_weights
    from cwa.analysis.model_weights import open_model_weights

    cluster_options = _options(options)
    first = inputs.runs[0]
    arch = inputs.architecture(first)
    paths = [inputs.score_path(run) for run in inputs.runs]
    reporter.info(f"clustering with {cluster_options.algorithm} on {len(paths)} score run(s)")
    if options["use_weights"]:
        model_cfg = (first.config or {}).get("model") or {}
        with open_model_weights(
            str(first.model_ref),
            arch=arch,
            dtype=str(model_cfg.get("dtype", "auto")),
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
            reporter=reporter,
        ) as weights:
            out = cluster_weights(paths, weights, weights.arch, cluster_options)
            source = weights.source
    else:
        out = cluster_weights(paths, None, arch, cluster_options)
        source = "not used"
    summary = out["summary"]
    tag = [
        pl.lit(first.run_id).alias("score_run_id"),
        pl.lit(cluster_options.algorithm).alias("algorithm"),
    ]
    clusters = out["clusters"].with_columns(tag)
    metrics = {
        "n_weights": float(summary["n_weights"]),
        "n_top": float(summary["n_top"]),
        "n_clusters": float(summary["n_clusters"]),
    }
    if summary["silhouette"] is not None:
        metrics["silhouette"] = float(summary["silhouette"])
    if "n_noise" in summary:
        metrics["n_noise"] = float(summary["n_noise"])
    if "inertia" in summary:
        metrics["inertia"] = float(summary["inertia"])
    display = DisplayTable(
        f"clusters ({cluster_options.algorithm}, {summary['n_weights']} weights, silhouette "
        f"{_fmt(summary['silhouette'])})",
        ("cluster", "size", "in top-N", "silhouette", "mean score", "mean |w|", "depth",
         "component", "layer"),
        [
            (r["cluster_id"], r["size"], r["n_top"], r["silhouette"], r["mean_score"],
             r["mean_abs_weight"], r["mean_depth"], r["top_component"], r["top_layer"])
            for r in clusters.iter_rows(named=True)
        ],
    )  # fmt: skip
    return AnalysisResult(
        tables={
            "analysis_clusters": clusters,
            "analysis_cluster_centroids": out["centroids"],
            "analysis_cluster_members": out["members"],
        },
        metrics=metrics,
        display=[display],
        effective={
            "features": summary["features"],
            "weights_source": source,
            "score_runs": [run.run_id for run in inputs.runs],
            "tensors": summary["tensors"],
        },
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


ANALYZER = AnalyzerSpec(
    name=NAME,
    version="1",
    description=DESCRIPTION,
    input_stages=("score",),
    run=_run,
    min_runs=1,
    max_runs=None,
    same_model=True,
    options=(
        AnalyzerOption(
            "algorithm",
            "str",
            "kmeans",
            "clustering algorithm",
            choices=("kmeans", "minibatch_kmeans", "dbscan"),
        ),
        AnalyzerOption("n_clusters", "int", 4, "clusters (k-means variants)", minimum=2),
        AnalyzerOption("top_n", "int", 1000, "global top-N of the first run", minimum=0),
        AnalyzerOption("sample_size", "int", 5000, "seeded uniform sample size", minimum=0),
        AnalyzerOption("seed", "int", 0, "seed of the sample, k-means and silhouette"),
        AnalyzerOption("eps", "float", 0.5, "DBSCAN radius (clustering space)", minimum=1e-12),
        AnalyzerOption("min_samples", "int", 5, "DBSCAN core-point threshold", minimum=1),
        AnalyzerOption("standardize", "bool", True, "z-score every feature before clustering"),
        AnalyzerOption(
            "silhouette_sample", "int", 2000, "points the silhouette is computed on", minimum=2
        ),
        AnalyzerOption("use_weights", "bool", True, "include |w| (reads the checkpoint)"),
    ),  # fmt: skip
    tables=("analysis_clusters", "analysis_cluster_centroids", "analysis_cluster_members"),
    validate=_validate,
)
