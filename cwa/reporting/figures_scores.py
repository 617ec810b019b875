"""Figures drawn from score and rank results: where the sensitivity sits.

Every function takes one aggregated polars table (its columns are named in the docstring and
produced by the paired SQL in :mod:`cwa.reporting.catalog`) and returns a matplotlib Figure.
No function loops over weights: the tables hold one row per component, layer or head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cwa.reporting.style import (
    FULL_WIDTH_IN,
    SEQUENTIAL_CMAP,
    colour,
    component_label,
    finish,
    integer_ticks,
    layer_label,
    legend,
    new_figure,
    styled,
)

if TYPE_CHECKING:
    import polars as pl
    from matplotlib.figure import Figure

QUANTILE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("p50", "median"),
    ("p90", "90th pct"),
    ("p99", "99th pct"),
    ("p99_9", "99.9th pct"),
    ("max", "max"),
)
_MARKERS = ("o", "s", "^", "D", "*")


@styled
def score_distribution(table: pl.DataFrame, *, metric: str = "score") -> Figure:
    """Columns: component, p50, p90, p99, max, and p99_9 when known.

    One row per component; a marker per quantile on a log axis, joined by a line from the
    median to the maximum so the tail length reads at a glance.
    """
    fig, ax = new_figure(height=0.9 + 0.28 * max(table.height, 1))
    labels = [component_label(c) for c in table["component"].to_list()]
    y = np.arange(table.height)
    lows = table["p50"].to_numpy().astype(float)
    highs = table["max"].to_numpy().astype(float)
    ax.hlines(y, lows, highs, color="#999999", linewidth=1, zorder=1)
    present = [(c, label) for c, label in QUANTILE_COLUMNS if c in table.columns]
    for i, (column, label) in enumerate(QUANTILE_COLUMNS):
        if column not in table.columns:
            continue
        ax.scatter(
            table[column].to_numpy().astype(float),
            y,
            s=16,
            marker=_MARKERS[i],
            color=colour(i),
            label=label,
            zorder=2,
        )
    values = table.select([c for c, _ in present]).to_numpy().astype(float)
    if np.all(values[np.isfinite(values)] > 0):
        ax.set_xscale("log")
    else:  # e.g. Hessian diagonals can be negative: keep the decades but allow zero and sign
        ax.set_xscale("symlog", linthresh=_linthresh(values))
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    legend(ax, outside=True)
    return finish(
        fig,
        ax,
        title="Score distribution per component",
        xlabel=f"{metric} score (log scale)",
        ylabel="component",
    )


def _linthresh(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values) & (values != 0)])
    return float(finite.min()) if finite.size else 1.0


def pivot_layer_component(
    table: pl.DataFrame, value: str
) -> tuple[np.ndarray, list[int], list[str]]:
    """(matrix[layer, component], layers, components) from long rows; missing cells are NaN."""
    layers = sorted(set(table["layer"].to_list()))
    components = sorted(set(table["component"].to_list()))
    matrix = np.full((len(layers), len(components)), np.nan)
    li = {v: i for i, v in enumerate(layers)}
    ci = {v: i for i, v in enumerate(components)}
    rows = np.array([li[v] for v in table["layer"].to_list()], dtype=int)
    cols = np.array([ci[v] for v in table["component"].to_list()], dtype=int)
    matrix[rows, cols] = table[value].to_numpy().astype(float)
    return matrix, layers, components


@styled
def sensitivity_heatmap(table: pl.DataFrame) -> Figure:
    """Columns: layer, component, mass_share (share of the run's total score mass, 0..1)."""
    matrix, layers, components = pivot_layer_component(table, "mass_share")
    fig, ax = new_figure(height=1.2 + 0.22 * len(layers))
    image = ax.imshow(matrix * 100.0, aspect="auto", cmap=SEQUENTIAL_CMAP, origin="upper")
    ax.set_xticks(range(len(components)), [component_label(c) for c in components], rotation=45)
    ax.set_yticks(range(len(layers)), [layer_label(v) for v in layers])
    fig.colorbar(image, ax=ax, label="score mass (%)")
    return finish(
        fig,
        ax,
        title="Sensitivity mass by layer and component",
        xlabel="component",
        ylabel="layer (block index)",
    )


def depth_trend(layers: np.ndarray, values: np.ndarray) -> tuple[float, float, bool]:
    """Least-squares line through (layer, log10 value) when all values are positive, else
    through (layer, value). Returns (slope, intercept, on_log_scale)."""
    finite = np.isfinite(values)
    use_log = bool(np.all(values[finite] > 0))
    y = np.log10(values[finite]) if use_log else values[finite]
    slope, intercept = np.polyfit(layers[finite].astype(float), y, 1)
    return float(slope), float(intercept), use_log


@styled
def depth_profile(table: pl.DataFrame, *, metric: str = "score") -> Figure:
    """Columns: layer, mean_score; optional slope, intercept, log_scale (a stored fit).

    Points: mean score per weight in each transformer block. Line: the fitted trend (from the
    analyze stage when its columns are present, else a least-squares fit of these points).
    """
    layers = table["layer"].to_numpy().astype(float)
    values = table["mean_score"].to_numpy().astype(float)
    if "slope" in table.columns and table["slope"][0] is not None:
        slope, intercept = float(table["slope"][0]), float(table["intercept"][0])
        use_log = bool(table["log_scale"][0]) if "log_scale" in table.columns else True
        source = "analyze"
        if "pattern" in table.columns and table["pattern"][0]:
            source += f", {table['pattern'][0]}"
    else:
        slope, intercept, use_log = depth_trend(layers, values)
        source = "least squares"
    fig, ax = new_figure()
    ax.plot(layers, values, "o", color=colour(0), label="mean per layer")
    grid = np.linspace(layers.min(), layers.max(), 50) if layers.size else layers
    fitted = slope * grid + intercept
    if use_log:
        fitted = 10**fitted
        ax.set_yscale("log")
        what = f"×{10**slope:.3g} per layer"
    else:
        what = f"{slope:+.3g} per layer"
    ax.plot(grid, fitted, "-", color=colour(3), label=f"trend ({source}): {what}")
    legend(ax, loc="best")
    integer_ticks(ax.xaxis)
    return finish(
        fig,
        ax,
        title="Depth profile of sensitivity",
        xlabel="layer (block index)",
        ylabel=f"mean {metric}" + (" (log scale)" if use_log else ""),
    )


@styled
def topk_composition(table: pl.DataFrame) -> Figure:
    """Columns: layer (-1 for weights outside blocks), component, n (top-k weights there).

    Stacked bars: one bar per layer, one colour per component.
    """
    matrix, layers, components = pivot_layer_component(table, "n")
    matrix = np.nan_to_num(matrix, nan=0.0)
    fig, ax = new_figure(width=FULL_WIDTH_IN / 1.4)
    x = np.arange(len(layers))
    bottom = np.zeros(len(layers))
    for j, component in enumerate(components):
        ax.bar(
            x, matrix[:, j], bottom=bottom, color=colour(j), label=component_label(component)
        )
        bottom += matrix[:, j]
    ax.set_xticks(x, [layer_label(v) for v in layers])
    legend(ax, outside=True)
    total = int(bottom.sum())
    return finish(
        fig,
        ax,
        title=f"Composition of the top {total} weights",
        xlabel="layer (block index; — = embeddings, final norm, lm_head)",
        ylabel="weights in the top-k (count)",
    )


HEAD_ORDER = ("attn_q", "attn_k", "attn_v", "attn_o")


@styled
def head_heatmap(table: pl.DataFrame, *, metric: str = "score") -> Figure:
    """Columns: component (attn_q/k/v/o), layer, head, n_heads, and either mean_score (mean
    |score| of the head's weights, from the profile analyzer) or n (top-k weights in the head).

    One panel per component, each with its own head count: under grouped-query attention k and
    v have fewer (key-value) heads than q and o, and their head indices are never mixed.
    """
    value = "mean_score" if "mean_score" in table.columns else "n"
    present = [c for c in HEAD_ORDER if c in set(table["component"].to_list())]
    fig, axes = new_figure(1, len(present), width=FULL_WIDTH_IN, height=2.6, squeeze=False)
    layers = sorted(set(table["layer"].to_list()))
    vmax = float(table[value].max() or 1)
    image = None
    for ax, component in zip(axes[0], present, strict=True):
        part = table.filter(table["component"] == component)
        n_heads = int(part["n_heads"].max())
        matrix = np.zeros((len(layers), n_heads))
        li = {v: i for i, v in enumerate(layers)}
        rows = np.array([li[v] for v in part["layer"].to_list()], dtype=int)
        matrix[rows, part["head"].to_numpy().astype(int)] = part[value].to_numpy().astype(float)
        image = ax.imshow(matrix, aspect="auto", cmap=SEQUENTIAL_CMAP, vmin=0, vmax=vmax)
        kind = "kv head" if component in ("attn_k", "attn_v") else "head"  # key-value
        ax.set_title(f"{component} ({n_heads} {kind}s)")
        ax.set_xlabel(f"{kind} index")
        ax.set_yticks(range(len(layers)), [layer_label(v) for v in layers])
    axes[0][0].set_ylabel("layer (block index)")
    if value == "n":
        label, title = "top-k weights (count)", "Top-k weights per attention head"
    else:
        label, title = f"mean |{metric}|", "Sensitivity per attention head"
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label=label)
    fig.suptitle(title, fontsize=9)
    return fig
