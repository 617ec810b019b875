"""``profile``: how the sensitivity of one score run is distributed over the architecture.

One streaming pass over the score file (tensor by tensor). Every group of weights gets a
mergeable log histogram of |score| (:mod:`cwa.analysis.histogram`: exact counts and group
masses; quantiles, Gini and top-1% share within one bin width, 0.78%), so memory is
O(largest tensor) plus a few KiB per group, never all scores. Levels (``analysis_profile.level``):

Tensors with at most ``exact_limit`` weights (default 2**16) get exact quantiles, Gini and
top-1% share at level ``tensor`` (a sorted copy of the tensor; ``method = 'exact'``); larger
tensors and every aggregate level use the histograms (``method = 'histogram'``).

- ``model`` (one row), ``tensor`` (per parameter), ``layer`` (per layer of the stack),
  ``component`` (embed, attn_q, ..., mlp_down, ...: fused tensors such as GPT-2 ``c_attn`` are
  split into their q/k/v blocks by the architecture map), ``layer_component``;
- ``head``: per (layer, component, head) in the component's own numbering (q/o: query head,
  k/v: key/value head), with ``kv_group`` = the kv head a query head reads;
- ``kv_group``: per (layer, kv head g): the query heads reading g (their q and o weights) plus
  g's k and v weights, each weight counted once (GQA-aware: shared k/v are not repeated per
  query head).

``share`` is the group's part of the model's |score| mass; ``layer_component`` rows also carry
``share_of_layer``, ``density_ratio`` (mean / the layer's mean) and ``rank_in_layer`` (1 = the
densest component), which compare q/k/v/o and up/gate/down within each layer. ``topk_count``
counts the weights of a global rank run of this score run (option ``rank_run``: ``auto`` = the
newest, ``none``, or a run id) that fall in the group.

The depth pattern (``analysis_depth_trend``) is fitted on the mean |score| per layer, for the
whole model and for each component (rules in :mod:`cwa.analysis.trend`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cwa.analysis.base import AnalysisResult, AnalyzerOption, AnalyzerSpec, DisplayTable
from cwa.errors import InvalidInput

LEVELS = ("model", "tensor", "layer", "component", "layer_component", "head", "kv_group")


@dataclass
class _Group:
    level: str
    key: str
    meta: dict[str, Any]
    hist: Any = field(default=None)
    exact: dict[str, float | None] | None = None  # exact statistics (small tensors)


class _Groups:
    def __init__(self) -> None:
        from cwa.analysis.histogram import LogHistogram

        self._hist_type = LogHistogram
        self.items: dict[tuple[str, str], _Group] = {}

    def get(self, level: str, key: str, **meta: Any) -> _Group:
        found = self.items.get((level, key))
        if found is None:
            found = _Group(level, key, meta, self._hist_type())
            self.items[(level, key)] = found
        return found

    def merge(self, level: str, key: str, hist: Any, **meta: Any) -> None:
        if hist.parts():
            self.get(level, key, **meta).hist.merge(hist)


def _layer_key(layer: int | None) -> str:
    return f"layer={'none' if layer is None else layer}"


def _sub_hist(bins: Any, rows: slice) -> Any:
    """LogHistogram of some rows of a tensor's fine-group bins (trimmed to occupied keys)."""
    from cwa.analysis.histogram import LogHistogram

    hist = LogHistogram()
    if rows.stop - rows.start == 1 or (rows.start == 0 and bins.counts.shape[0] == 1):
        counts, mass = bins.counts[rows.start], bins.mass[rows.start]  # views, no sum
    else:
        counts, mass = bins.counts[rows].sum(axis=0), bins.mass[rows].sum(axis=0)
    if counts.any():
        hist.add_bins(
            bins.lo,
            counts,
            mass,
            float(bins.vmin[rows].min()),
            float(bins.vmax[rows].max()),
            float(bins.exact[rows].sum()),
        )
    return hist


def exact_stats(values: np.ndarray) -> dict[str, float | None]:
    """Exact quantiles (numpy's linear rule), Gini and top-1% share of |values| (one sort)."""
    x = np.abs(values[~np.isnan(values)]).astype(np.float64)
    x.sort()
    n = x.size
    total = float(x.sum())
    out: dict[str, float | None] = {
        f"p{round(q * 100)}": float(np.quantile(x, q)) for q in (0.5, 0.9, 0.99)
    }
    if total > 0:
        ranks = np.arange(1, n + 1, dtype=np.float64)
        out["gini"] = float(np.sum((2 * ranks - n - 1) * x) / (n * total))
        out["top1pct_share"] = float(x[n - math.ceil(0.01 * n) :].sum() / total)
    else:
        out["gini"] = out["top1pct_share"] = None
    return out


def _profile_tensor(groups: _Groups, arch: Any, name: str, tensor: Any, exact_limit: int) -> None:
    from cwa.analysis.profile_bins import tensor_fine_bins

    info = arch.params[name]
    bins = tensor_fine_bins(arch, name, tensor)
    if bins is None:
        return
    whole = _sub_hist(bins, slice(0, bins.counts.shape[0]))
    if not whole.parts():
        return
    layer = info.layer
    comps = info.components
    groups.merge("model", "all", whole)
    groups.merge("tensor", name, whole, parameter=name, layer=layer, component=",".join(comps))
    if tensor.numel() <= exact_limit:
        values = tensor.float().numpy().reshape(-1)
        groups.items[("tensor", name)].exact = exact_stats(values)
    if layer is not None:
        groups.merge("layer", _layer_key(layer), whole, layer=layer)
    for i, comp in enumerate(comps):
        hist = whole if len(comps) == 1 else _sub_hist(bins, bins.rows(i))
        groups.merge("component", comp, hist, component=comp)
        if layer is not None:
            key = f"{_layer_key(layer)},{comp}"
            groups.merge("layer_component", key, hist, layer=layer, component=comp)
    per_head = {}
    for i in range(len(comps)):
        for head in range(bins.n_heads):
            if bins.counts[bins.rows(i, head)].any():
                per_head[i * bins.n_heads + head] = _sub_hist(bins, bins.rows(i, head))
    n_heads = bins.n_heads
    for g, hist in per_head.items():
        comp, head = comps[g // n_heads], g % n_heads
        kv_group = head if comp in ("attn_k", "attn_v") else head // arch.group_size
        key = f"{_layer_key(layer)},{comp},head={head}"
        groups.merge("head", key, hist, layer=layer, component=comp, head=head, kv_group=kv_group)
        key = f"{_layer_key(layer)},kv_group={kv_group}"
        groups.merge("kv_group", key, hist, layer=layer, kv_group=kv_group)


def _rows(groups: _Groups, score_run_id: str) -> list[dict[str, Any]]:
    from cwa.analysis.histogram import batch_stats

    model = groups.items[("model", "all")].hist
    total = model.exact_total
    rows = []
    stats = batch_stats([group.hist for group in groups.items.values()])
    for ((level, key), group), stat in zip(groups.items.items(), stats, strict=True):
        hist = group.hist
        n = hist.n
        mass = hist.exact_total
        row = {
            "score_run_id": score_run_id,
            "level": level,
            "group_key": key,
            "layer": group.meta.get("layer"),
            "component": group.meta.get("component"),
            "head": group.meta.get("head"),
            "kv_group": group.meta.get("kv_group"),
            "parameter": group.meta.get("parameter"),
            "n": n,
            "mass": mass,
            "share": mass / total if total > 0 else None,
            "mean": mass / n if n else None,
            "min": hist.vmin if n else None,
            "p50": stat["p50"],
            "p90": stat["p90"],
            "p99": stat["p99"],
            "max": hist.vmax if n else None,
            "gini": stat["gini"],
            "top1pct_share": stat["top1pct_share"],
            "method": "histogram",
        }
        if group.exact is not None:
            row.update(group.exact, method="exact")
        rows.append(row)
    _layer_comparison(rows)
    return rows


def _layer_comparison(rows: list[dict[str, Any]]) -> None:
    layers = {r["layer"]: r for r in rows if r["level"] == "layer"}
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        if row["level"] == "layer_component":
            by_layer.setdefault(row["layer"], []).append(row)
    for layer, members in by_layer.items():
        whole = layers[layer]
        members.sort(key=lambda r: -(r["mean"] or 0.0))
        for rank, row in enumerate(members, start=1):
            row["rank_in_layer"] = rank
            row["share_of_layer"] = row["mass"] / whole["mass"] if whole["mass"] else None
            if whole["mean"] and row["mean"] is not None:
                row["density_ratio"] = row["mean"] / whole["mean"]


def _trends(rows: list[dict[str, Any]], score_run_id: str, options: dict) -> list[dict]:
    from cwa.analysis.trend import fit_depth_trend

    knobs = {
        "flat_tolerance": options["flat_tolerance"],
        "min_r2": options["min_r2"],
        "curvature_gain": options["curvature_gain"],
    }
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        if row["level"] == "layer" and row["mean"] is not None:
            series.setdefault("model", {})[row["layer"]] = row["mean"]
        elif row["level"] == "layer_component" and row["mean"] is not None:
            series.setdefault(row["component"], {})[row["layer"]] = row["mean"]
    out = []
    for scope, values in series.items():
        ordered = [values[layer] for layer in sorted(values)]
        out.append(
            {"score_run_id": score_run_id, "scope": scope, **fit_depth_trend(ordered, **knobs)}
        )
    return out


def _validate(inputs: Any, options: dict[str, Any]) -> None:
    from cwa.analysis.common import scored_names
    from cwa.analysis.profile_topk import rank_run_for

    run = inputs.runs[0]
    scored_names(inputs, run, inputs.architecture(run))
    rank_run_for(inputs, run, options["rank_run"])


def _run(inputs: Any, options: dict[str, Any], reporter: Any) -> AnalysisResult:
    from cwa.analysis.common import scored_names
    from cwa.analysis.profile_topk import rank_run_for, topk_counts

    run = inputs.runs[0]
    arch = inputs.architecture(run)
    names = scored_names(inputs, run, arch)
    groups = _Groups()
    task = reporter.task("profile", total=len(names))
    with inputs.open_scores(run) as reader:
        for name in names:
            _profile_tensor(groups, arch, name, reader.get(name), options["exact_limit"])
            task.advance()
    task.close()
    if ("model", "all") not in groups.items:
        raise InvalidInput(f"score run {run.run_id} has no finite score to profile")
    rows = _rows(groups, run.run_id)
    rank_id = rank_run_for(inputs, run, options["rank_run"])
    if rank_id is not None:
        ranked = inputs.query(
            "SELECT parameter, layer, component, head FROM ranked_weights WHERE run_id = ? "
            "AND group_key = 'all'",
            [rank_id],
        )
        topk_counts(rows, ranked, arch.group_size)
    trends = _trends(rows, run.run_id, options)
    return _result(rows, trends, rank_id)


def _result(rows: list[dict], trends: list[dict], rank_id: str | None) -> AnalysisResult:
    model = next(r for r in rows if r["level"] == "model")
    whole = next((t for t in trends if t["scope"] == "model"), None)
    metrics = {
        "n_weights": float(model["n"]),
        "gini": model["gini"],
        "top1pct_share": model["top1pct_share"],
        "n_groups": float(len(rows)),
    }
    if whole is not None and whole["slope"] is not None:
        metrics.update(depth_slope=whole["slope"], depth_r2_linear=whole["r2_linear"] or 0.0)
    layer_rows = [
        (
            r["layer"],
            r["n"],
            r["share"],
            r["mean"],
            r["gini"],
            r["top1pct_share"],
            r.get("topk_count"),
        )
        for r in sorted((r for r in rows if r["level"] == "layer"), key=lambda r: r["layer"])
    ]
    comp_rows = [
        (r["component"], r["n"], r["share"], r["mean"], r["gini"])
        for r in sorted((r for r in rows if r["level"] == "component"), key=lambda r: -r["share"])
    ]
    trend_rows = [
        (t["scope"], t["pattern"], t["slope"], t["r2_linear"], t["curvature"], t["r2_quadratic"])
        for t in trends
    ]
    return AnalysisResult(
        tables={"analysis_profile": rows, "analysis_depth_trend": trends},
        metrics={k: float(v) for k, v in metrics.items() if v is not None},
        display=[
            DisplayTable(
                "per layer", ("layer", "n", "share", "mean", "gini", "top1%", "topk"), layer_rows
            ),
            DisplayTable("per component", ("component", "n", "share", "mean", "gini"), comp_rows),
            DisplayTable(
                "depth pattern",
                ("scope", "pattern", "slope", "r2_lin", "curv", "r2_quad"),
                trend_rows,
            ),
        ],
        effective={"rank_run": rank_id},
    )


ANALYZER = AnalyzerSpec(
    name="profile",
    version="1",
    description="score distribution per tensor/layer/component/head, concentration, depth pattern",
    input_stages=("score",),
    run=_run,
    min_runs=1,
    max_runs=1,
    options=(
        AnalyzerOption(
            "exact_limit",
            "int",
            1 << 16,
            "tensors with at most this many weights get exact quantiles/Gini (one sort)",
            minimum=0,
        ),
        AnalyzerOption(
            "rank_run", "str", "auto", "global rank run of this score run: auto, none or an id"
        ),
        AnalyzerOption(
            "flat_tolerance",
            "float",
            0.10,
            "depth pattern 'flat' below this relative range",
            minimum=0.0,
        ),
        AnalyzerOption(
            "min_r2",
            "float",
            0.5,
            "least R^2 for a trend to name the pattern",
            minimum=0.0,
            maximum=1.0,
        ),
        AnalyzerOption(
            "curvature_gain",
            "float",
            0.15,
            "R^2 gain of the quadratic fit for peak/valley",
            minimum=0.0,
        ),
    ),
    tables=("analysis_profile", "analysis_depth_trend"),
    validate=_validate,
)
