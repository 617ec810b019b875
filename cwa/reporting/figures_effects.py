"""Figures drawn from perturbation and evaluation results: what the critical weights do.

Each function takes one aggregated polars table (one row per selection and k, scale, task or
layer; columns in the docstring, produced by the paired SQL in :mod:`cwa.reporting.catalog`) and
returns a matplotlib Figure. Controls are drawn as a band over their seeds so that the treatment
is read against the spread of random draws, not against one lucky draw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cwa.reporting.style import (
    FULL_WIDTH_IN,
    colour,
    finish,
    integer_ticks,
    legend,
    new_figure,
    selection_colour,
    spans_decades,
    styled,
)

if TYPE_CHECKING:
    import polars as pl
    from matplotlib.figure import Figure

_SELECTION_ORDER = ("top_k", "random_k", "bottom_k", "all_k")


def _ordered(values: list[str]) -> list[str]:
    known = [s for s in _SELECTION_ORDER if s in values]
    return known + sorted(v for v in set(values) if v not in _SELECTION_ORDER)


def _damage_curve(
    table: pl.DataFrame, x_column: str, *, title: str, xlabel: str, ylabel: str
) -> Figure:
    """Shared body of damage-vs-k and damage-vs-scale.

    Columns: selection, method, <x_column>, n (conditions), mean, lo, hi (min and max over
    seeds). A selection with one condition per x (top_k, bottom_k) is a line; one with several
    seeds (random_k) is its mean line inside a shaded min–max band.
    """
    fig, ax = new_figure(width=5.0, height=2.8)  # room for the legend beside the curves
    methods = sorted(set(table["method"].to_list()))
    styles = ("-", "--", ":", "-.")
    for m, method in enumerate(methods):
        for i, selection in enumerate(_ordered(table["selection"].to_list())):
            part = table.filter(
                (table["selection"] == selection) & (table["method"] == method)
            ).sort(x_column)
            if part.height == 0:
                continue
            x = part[x_column].to_numpy().astype(float)
            label = selection if len(methods) == 1 else f"{selection} ({method})"
            c = selection_colour(selection, i)
            ax.plot(x, part["mean"].to_numpy(), styles[m % 4], marker="o", ms=3, color=c,
                    label=label, gid=f"line:{method}:{selection}")
            if int(part["n"].max()) > 1:
                ax.fill_between(
                    x, part["lo"].to_numpy(), part["hi"].to_numpy(), color=c, alpha=0.25,
                    linewidth=0, label=f"{selection} min–max over seeds",
                    gid=f"band:{method}:{selection}",
                )
    ax.axhline(1.0, color="#000000", linewidth=0.6, linestyle=":", label="unperturbed")
    if spans_decades(table["hi"].to_list() + table["mean"].to_list()):
        ax.set_yscale("log")
        ylabel += " (log)"
    if x_column == "k" and spans_decades(table["k"].to_list(), 1.5):
        ax.set_xscale("log")
        xlabel += " (log scale)"
    legend(ax, outside=True)
    return finish(fig, ax, title=title, xlabel=xlabel, ylabel=ylabel)


@styled
def damage_vs_k(table: pl.DataFrame, *, metric: str = "perplexity") -> Figure:
    """Columns: selection, method, k, n, mean, lo, hi (ratio of the metric to the baseline)."""
    return _damage_curve(
        table,
        "k",
        title=f"Damage vs number of perturbed weights ({metric})",
        xlabel="k (weights perturbed)",
        ylabel=f"{metric} ratio to unperturbed",
    )


@styled
def damage_vs_scale(table: pl.DataFrame, *, metric: str = "perplexity") -> Figure:
    """Columns: selection, method, scale, n, mean, lo, hi (ratio of the metric to baseline)."""
    return _damage_curve(
        table,
        "scale",
        title=f"Damage vs perturbation scale ({metric})",
        xlabel="scale (multiplier, or noise in tensor std)",
        ylabel=f"{metric} ratio to unperturbed",
    )


@styled
def task_deltas(table: pl.DataFrame) -> Figure:
    """Columns: task, metric, selection, n, mean_delta, std_delta (accuracy points, 0..1).

    Grouped bars: one group per task metric, one bar per selection, error bars = std over seeds.
    """
    table = table.with_columns((table["task"] + " " + table["metric"]).alias("_what"))
    whats = sorted(set(table["_what"].to_list()))
    selections = _ordered(table["selection"].to_list())
    width = 0.8 / max(len(selections), 1)
    fig, ax = new_figure(width=max(3.5, min(FULL_WIDTH_IN, 1.0 + 0.9 * len(whats))))
    x = np.arange(len(whats))
    for i, selection in enumerate(selections):
        part = table.filter(table["selection"] == selection)
        index = {w: j for j, w in enumerate(whats)}
        pos = np.array([index[w] for w in part["_what"].to_list()], dtype=float)
        heights = part["mean_delta"].to_numpy().astype(float) * 100.0
        errors = np.nan_to_num(part["std_delta"].to_numpy().astype(float) * 100.0)
        ax.bar(pos - 0.4 + width * (i + 0.5), heights, width, yerr=errors, capsize=2,
               color=selection_colour(selection, i), label=selection, gid=f"bars:{selection}")
    ax.axhline(0.0, color="#000000", linewidth=0.6)
    ax.set_xticks(x, whats, rotation=20)
    legend(ax, outside=True)
    return finish(
        fig,
        ax,
        title="Downstream task change per selection",
        xlabel="task and metric",
        ylabel="change (percentage points)",
    )


@styled
def superweight_profile(table: pl.DataFrame) -> Figure:
    """Columns: layer, max_input, max_output (max |activation| into / out of the MLP down
    projection of each layer, over calibration tokens).

    A super weight shows as a spike of both lines at one early layer (Yu et al. 2024).
    """
    table = table.sort("layer")
    fig, ax = new_figure()
    layers = table["layer"].to_numpy()
    ax.plot(layers, table["max_input"].to_numpy(), "-o", ms=3, color=colour(0),
            label="into down projection (max |input|)")
    ax.plot(layers, table["max_output"].to_numpy(), "-s", ms=3, color=colour(3),
            label="out of down projection (max |output|)")
    values = table["max_input"].to_list() + table["max_output"].to_list()
    integer_ticks(ax.xaxis)
    log = spans_decades(values, 1.0) and all(v > 0 for v in values if v is not None)
    if log:
        ax.set_yscale("log")
    legend(ax)
    return finish(
        fig,
        ax,
        title="Super-weight activation profile",
        xlabel="layer (block index)",
        ylabel="max |activation|" + (" (log scale)" if log else ""),
    )


@styled
def flipped_items(table: pl.DataFrame) -> Figure:
    """Columns: task, selection, n (conditions), mean_flipped, lo, hi (items whose correctness
    changed versus the unperturbed model: mean and min–max over seeds).

    Grouped bars per task; the treatment should flip far more items than any control.
    """
    tasks = sorted(set(table["task"].to_list()))
    selections = _ordered(table["selection"].to_list())
    width = 0.8 / max(len(selections), 1)
    fig, ax = new_figure()
    index = {t: j for j, t in enumerate(tasks)}
    for i, selection in enumerate(selections):
        part = table.filter(table["selection"] == selection)
        pos = np.array([index[t] for t in part["task"].to_list()], dtype=float)
        mean = part["mean_flipped"].to_numpy().astype(float)
        err = np.vstack([mean - part["lo"].to_numpy(), part["hi"].to_numpy() - mean])
        ax.bar(pos - 0.4 + width * (i + 0.5), mean, width, yerr=err, capsize=2,
               color=selection_colour(selection, i), label=selection, gid=f"bars:{selection}")
    ax.set_xticks(np.arange(len(tasks)), tasks)
    legend(ax, outside=True)
    return finish(
        fig,
        ax,
        title="Items flipped by the treatment vs the controls",
        xlabel="task",
        ylabel="items with a changed answer",
    )
