"""Figures drawn from the analyze stage's tables: stability, correlation, clusters.

Each function takes one aggregated polars table (columns in the docstring, produced by the
paired SQL in :mod:`cwa.reporting.catalog`) and returns a matplotlib Figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cwa.reporting.style import (
    DIVERGING_CMAP,
    colour,
    finish,
    legend,
    new_figure,
    spans_decades,
    styled,
)

if TYPE_CHECKING:
    import polars as pl
    from matplotlib.figure import Figure

_STATISTIC_LABELS = {
    "jaccard": "Jaccard",
    "rbo": "RBO",
    "overlap_frac": "overlap / k",
    "spearman": "Spearman ρ",
    "kendall": "Kendall τ",
}


@styled
def stability_curves(table: pl.DataFrame) -> Figure:
    """Columns: statistic (jaccard, rbo, ...), k, n_pairs, mean, ci_low, ci_high.

    One line per statistic against k; the band is the interval over the seeds' pairs (the
    analyze stage's confidence interval, or min–max when it stored no interval).
    """
    fig, ax = new_figure()
    statistics = [s for s in _STATISTIC_LABELS if s in set(table["statistic"].to_list())]
    for i, statistic in enumerate(statistics):
        part = table.filter(table["statistic"] == statistic).sort("k")
        x = part["k"].to_numpy().astype(float)
        c = colour(i)
        ax.plot(x, part["mean"].to_numpy(), "-o", ms=3, color=c,
                label=_STATISTIC_LABELS[statistic], gid=f"line:{statistic}")
        lo = part["ci_low"].to_numpy().astype(float)
        hi = part["ci_high"].to_numpy().astype(float)
        if np.isfinite(lo).any():
            ax.fill_between(x, lo, hi, color=c, alpha=0.2, linewidth=0, gid=f"band:{statistic}")
    n_pairs = int(table["n_pairs"].max())
    xlabel = "k (top weights compared)"
    if spans_decades(table["k"].to_list(), 1.0):
        ax.set_xscale("log")
        xlabel += " (log scale)"
    ax.set_ylim(0, 1.02)
    legend(ax, title=f"mean over {n_pairs} pair(s) of runs")
    return finish(
        fig,
        ax,
        title="Ranking stability across seeds",
        xlabel=xlabel,
        ylabel="top-k agreement (1 = identical)",
    )


@styled
def correlation_heatmap(
    table: pl.DataFrame, *, title: str = "Correlation", axis_label: str = "", statistic: str = ""
) -> Figure:
    """Columns: row_key, col_key, value (a long-form square matrix; labels in order of first
    appearance). Cells are annotated with their value; the colour scale is fixed to [-1, 1]."""
    keys = list(dict.fromkeys(table["row_key"].to_list() + table["col_key"].to_list()))
    index = {k: i for i, k in enumerate(keys)}
    matrix = np.full((len(keys), len(keys)), np.nan)
    rows = np.array([index[k] for k in table["row_key"].to_list()], dtype=int)
    cols = np.array([index[k] for k in table["col_key"].to_list()], dtype=int)
    values = table["value"].to_numpy().astype(float)
    matrix[rows, cols] = values
    # A symmetric statistic stored as one triangle: mirror it.
    mirror = np.isnan(matrix) & ~np.isnan(matrix.T)
    matrix[mirror] = matrix.T[mirror]
    if statistic in ("spearman", "kendall", "pearson"):
        # A run or layer correlates perfectly with itself; analyzers need not store it.
        diagonal = np.isnan(np.diag(matrix))
        matrix[np.flatnonzero(diagonal), np.flatnonzero(diagonal)] = 1.0
    size = 2.4 + 0.28 * len(keys)
    fig, ax = new_figure(width=min(size + 1.0, 7.0), height=min(size, 6.5))
    image = ax.imshow(matrix, cmap=DIVERGING_CMAP, vmin=-1, vmax=1)
    ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right")
    ax.set_yticks(range(len(keys)), keys)
    if len(keys) <= 12:
        for (i, j), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label=_STATISTIC_LABELS.get(statistic, statistic or "value"))
    return finish(fig, ax, title=title, xlabel=axis_label, ylabel=axis_label)


@styled
def metric_correlation(table: pl.DataFrame, *, statistic: str = "spearman") -> Figure:
    """Columns: row_key, col_key, value (labels like 'grad_x_weight s0')."""
    return correlation_heatmap(
        table, title="Agreement between score runs (metrics, seeds)",
        axis_label="score run (metric, seed)", statistic=statistic,
    )


@styled
def layer_correlation(table: pl.DataFrame, *, statistic: str = "spearman") -> Figure:
    """Columns: row_key, col_key, value (labels like 'layer=3')."""
    return correlation_heatmap(
        table, title="Similarity of score patterns between layers",
        axis_label="layer", statistic=statistic,
    )


def project_centroids(table: pl.DataFrame) -> pl.DataFrame:
    """Long-form centroids (cluster, size, label, feature, value_scaled) -> one row per cluster
    with x, y = its coordinates on the first two principal axes of the centroids.

    A display projection of a handful of cluster centres (not of the weights themselves).
    """
    import polars as pl

    wide = table.pivot(on="feature", index=["cluster", "size", "label"], values="value_scaled")
    wide = wide.sort("cluster")
    features = [c for c in wide.columns if c not in ("cluster", "size", "label")]
    matrix = np.nan_to_num(wide.select(features).to_numpy().astype(float))
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    if centred.shape[0] > 1 and np.any(centred):
        u, sing, _ = np.linalg.svd(centred, full_matrices=False)
        coords = u[:, :2] * sing[:2]
    else:
        coords = np.zeros((centred.shape[0], 2))
    if coords.shape[1] < 2:
        coords = np.hstack([coords, np.zeros((coords.shape[0], 2 - coords.shape[1]))])
    return wide.select("cluster", "size", "label").with_columns(
        pl.Series("x", coords[:, 0]), pl.Series("y", coords[:, 1])
    )


@styled
def clusters(table: pl.DataFrame) -> Figure:
    """Columns: cluster, size (weights), label, feature, value_scaled (centroids, long form).

    One marker per cluster at its centre projected on the centres' two principal axes, its
    area proportional to its size.
    """
    table = project_centroids(table)
    fig, ax = new_figure()
    sizes = table["size"].to_numpy().astype(float)
    area = 30.0 + 600.0 * sizes / max(float(sizes.max()), 1.0)
    colours = [colour(int(c)) for c in table["cluster"].to_list()]
    ax.scatter(table["x"].to_numpy(), table["y"].to_numpy(), s=area, c=colours, alpha=0.75,
               edgecolors="black", linewidths=0.4, gid="clusters")
    for x, y, label, size in zip(table["x"].to_list(), table["y"].to_list(),
                                 table["label"].to_list(), table["size"].to_list(), strict=True):
        ax.annotate(f"{label} ({int(size):,})", (x, y), fontsize=6, ha="center", va="bottom",
                    xytext=(0, 6), textcoords="offset points")
    return finish(
        fig, ax, title="Clusters of critical weights",
        xlabel="principal axis 1 of the cluster centres (standardised units)",
        ylabel="principal axis 2 (standardised units)",
    )
