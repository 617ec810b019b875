"""``drift``: how far the sensitivity of each tensor moved between two score runs.

Typical inputs: a base and a fine-tuned checkpoint (different models with the same parameter
names and shapes), or one model scored on calibration set A and B. The two score files are
read in lockstep, one tensor of each at a time. Per tensor, and for the whole model (row
``parameter = '*'``):

- ``ks``: the Kolmogorov-Smirnov statistic between the two |score| distributions, evaluated at
  the edges of the shared log histogram (:mod:`cwa.analysis.histogram`, 128 bins per power of
  two). It never exceeds the exact KS and differs from it only inside one bin;
- ``wasserstein``: mean |q_a(u) - q_b(u)| over the 99 percentiles u = 1%..99% of |score| (the
  1-Wasserstein distance of the central 98% of the distributions, on histogram quantiles), and
  ``wasserstein_rel`` = that divided by run a's mean |score| (scale-free);
- ``topk_overlap``: |top_k(a) ∩ top_k(b)| / k of the tensor's own top-k (option ``k``, default
  100, capped at the tensor size), ranked by score like ``cwa rank``; for ``*`` the global
  top-k (streaming merge);
- ``moved``: ``topk_overlap < threshold`` (default 0.5) or ``ks > ks_threshold`` (default 0.1).

``drift_rank`` orders the tensors by top-k overlap (lowest first), then KS (highest first):
the tensors whose critical region moved most come first (view ``analysis_drifted_tensors``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cwa.analysis.base import AnalysisResult, AnalyzerOption, AnalyzerSpec, DisplayTable

PERCENTILES = np.arange(1, 100) / 100.0


def _magnitudes(values: np.ndarray) -> np.ndarray:
    mags = np.abs(values)
    if mags.size and not np.isfinite(mags.max()):
        mags = mags[np.isfinite(mags)]
    return mags


def _hist(mags: np.ndarray) -> Any:
    from cwa.analysis.histogram import LogHistogram, tensor_bins

    hist = LogHistogram()
    if mags.size:
        lo, counts, mass, vmin, vmax = tensor_bins(mags)
        hist.add_bins(lo, counts[0], mass[0], float(vmin[0]), float(vmax[0]))
    return hist


def ks_from_histograms(a: Any, b: Any) -> float | None:
    """max |F_a - F_b| over the bin edges of two LogHistograms."""
    if a.n == 0 or b.n == 0:
        return None
    lo = min(a.lo, b.lo)
    hi = max(a.lo + a.counts.size, b.lo + b.counts.size)
    ca = np.zeros(hi - lo)
    cb = np.zeros(hi - lo)
    ca[a.lo - lo : a.lo - lo + a.counts.size] = a.counts
    cb[b.lo - lo : b.lo - lo + b.counts.size] = b.counts
    return float(np.max(np.abs(np.cumsum(ca) / a.n - np.cumsum(cb) / b.n)))


def wasserstein_from_histograms(a: Any, b: Any) -> float | None:
    if a.n == 0 or b.n == 0:
        return None
    qa = np.array([a.quantile(u) for u in PERCENTILES])
    qb = np.array([b.quantile(u) for u in PERCENTILES])
    return float(np.mean(np.abs(qa - qb)))


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the k highest scores (NaN never ranked)."""
    if np.isnan(values.max()) if values.size else False:
        values = np.where(np.isnan(values), -np.inf, values)
    k = min(k, values.size)
    return np.argpartition(-values, k - 1)[:k]


def _tensor_row(name: str, info: Any, va: np.ndarray, vb: np.ndarray, options: dict) -> tuple:
    ha, hb = _hist(_magnitudes(va)), _hist(_magnitudes(vb))
    k = min(options["k"], va.size)
    overlap = np.intersect1d(top_indices(va, k), top_indices(vb, k)).size / k if k else None
    row = {
        "parameter": name,
        "layer": info.layer,
        "component": ",".join(info.components),
        "numel": int(va.size),
        "ks": ks_from_histograms(ha, hb),
        "wasserstein": wasserstein_from_histograms(ha, hb),
        "mean_a": ha.total / ha.n if ha.n else None,
        "mean_b": hb.total / hb.n if hb.n else None,
        "topk": k,
        "topk_overlap": overlap,
        "_mass": (ha.total, hb.total),
    }
    return row, ha, hb


def _finish(row: dict, options: dict) -> None:
    if row["wasserstein"] is not None and row["mean_a"]:
        row["wasserstein_rel"] = row["wasserstein"] / row["mean_a"]
    overlap, ks = row["topk_overlap"], row["ks"]
    row["moved"] = bool(
        (overlap is not None and overlap < options["threshold"])
        or (ks is not None and ks > options["ks_threshold"])
    )


def _validate(inputs: Any, options: dict) -> None:
    from cwa.analysis.common import common_names

    common_names(inputs, inputs.runs, inputs.architecture(inputs.runs[0]))


def _run(inputs: Any, options: dict, reporter: Any) -> AnalysisResult:
    from cwa.analysis.common import common_names, read_scores
    from cwa.analysis.histogram import LogHistogram
    from cwa.ranking import RunningTopK

    run_a, run_b = inputs.runs
    arch = inputs.architecture(run_a)
    names = common_names(inputs, inputs.runs, arch)
    params = list(arch.params)
    model_a, model_b = LogHistogram(), LogHistogram()
    global_a, global_b = RunningTopK(options["k"]), RunningTopK(options["k"])
    rows = []
    task = reporter.task("drift", total=len(names))
    with inputs.open_scores(run_a) as reader_a, inputs.open_scores(run_b) as reader_b:
        for name in names:
            va, vb = read_scores(reader_a, name), read_scores(reader_b, name)
            row, ha, hb = _tensor_row(name, arch.params[name], va, vb, options)
            model_a.merge(ha)
            model_b.merge(hb)
            position = params.index(name)
            for top, values in ((global_a, va), (global_b, vb)):
                valid = ~np.isnan(values) if np.isnan(values.max()) else None
                flats = None if valid is None else np.flatnonzero(valid)
                top.offer(position, values if valid is None else values[flats], flats)
            rows.append(row)
            task.advance()
    task.close()
    total_a, total_b = model_a.total, model_b.total
    for row in rows:
        mass_a, mass_b = row.pop("_mass")
        row["share_a"] = mass_a / total_a if total_a else None
        row["share_b"] = mass_b / total_b if total_b else None
        _finish(row, options)
    ordered = sorted(rows, key=lambda r: (r["topk_overlap"] or 0.0, -(r["ks"] or 0.0)))
    for rank, row in enumerate(ordered, start=1):
        row["drift_rank"] = rank
    ids_a = set(zip(global_a.positions.tolist(), global_a.flats.tolist(), strict=True))
    ids_b = set(zip(global_b.positions.tolist(), global_b.flats.tolist(), strict=True))
    k_global = min(global_a.keys.size, global_b.keys.size)
    model_row = {
        "parameter": "*",
        "layer": None,
        "component": None,
        "numel": int(sum(r["numel"] for r in rows)),
        "ks": ks_from_histograms(model_a, model_b),
        "wasserstein": wasserstein_from_histograms(model_a, model_b),
        "mean_a": total_a / model_a.n if model_a.n else None,
        "mean_b": total_b / model_b.n if model_b.n else None,
        "topk": k_global,
        "topk_overlap": len(ids_a & ids_b) / k_global if k_global else None,
        "share_a": 1.0,
        "share_b": 1.0,
        "drift_rank": None,
    }
    _finish(model_row, options)
    for row in [model_row, *rows]:
        row.update(run_a=run_a.run_id, run_b=run_b.run_id)
        row.setdefault("wasserstein_rel", None)
    return _result(model_row, ordered)


def _result(model_row: dict, ordered: list[dict]) -> AnalysisResult:
    metrics = {
        "n_tensors": float(len(ordered)),
        "n_moved": float(sum(r["moved"] for r in ordered)),
    }
    for key in ("ks", "wasserstein_rel", "topk_overlap"):
        if model_row[key] is not None:
            metrics[f"model_{key}"] = float(model_row[key])
    display = [
        (
            r["drift_rank"],
            r["parameter"],
            r["topk_overlap"],
            r["ks"],
            r["wasserstein_rel"],
            r["moved"],
        )
        for r in ordered
    ]
    return AnalysisResult(
        tables={"analysis_drift": [model_row, *ordered]},
        metrics=metrics,
        display=[
            DisplayTable(
                "tensors that moved most",
                ("rank", "parameter", "topk_overlap", "ks", "wasserstein_rel", "moved"),
                display,
            )
        ],
    )


ANALYZER = AnalyzerSpec(
    name="drift",
    version="1",
    description="per-tensor shift (KS, Wasserstein) and top-k movement between two runs",
    input_stages=("score",),
    run=_run,
    min_runs=2,
    max_runs=2,
    same_model=False,
    options=(
        AnalyzerOption("k", "int", 100, "top-k per tensor (and global) for the overlap", minimum=1),
        AnalyzerOption(
            "threshold",
            "float",
            0.5,
            "moved when top-k overlap is below this",
            minimum=0.0,
            maximum=1.0,
        ),
        AnalyzerOption(
            "ks_threshold", "float", 0.1, "moved when KS is above this", minimum=0.0, maximum=1.0
        ),
    ),
    tables=("analysis_drift",),
    validate=_validate,
)
