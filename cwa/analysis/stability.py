"""``stability``: do two or more score runs of one model agree on their most critical weights?

For every pair of runs (seeds, calibration sets, metrics), every group (``global`` = the whole
model, each ``layer``, each ``component``) and every k of the list (default
``100,1000,10000,0.1%``; a percentage is of the group's scored weights; a k larger than a
layer/component group is skipped for that group, larger than the model is an error):

- ``overlap`` = |top_k(a) ∩ top_k(b)|, ``overlap_frac`` = overlap / k,
  ``jaccard`` = overlap / |top_k(a) ∪ top_k(b)|;
- ``rbo``: tie-aware extrapolated rank-biased overlap with persistence ``p`` (default 0.99;
  :mod:`cwa.analysis.rbo`);
- ``spearman`` and ``kendall`` (tau-b, scipy) between the two runs' scores on the union of the
  two top-k sets (the scores of items outside a run's top-k come from its score file, captured
  during the same single pass: :mod:`cwa.analysis.topk`).

Top-k sets are exact and ordered like ``cwa rank`` (global top-k is a streaming merge of
per-tensor top-k). ``analysis_stability_summary`` gives, per group, k and statistic, the mean,
std, min and max over the pairs and a percentile bootstrap confidence interval that resamples
*runs* (with replacement; each resample averages the statistic over its pairs of distinct
runs), so that the interval reflects run-to-run variation rather than treating the
overlapping pairs as independent. With two runs there is one pair and no interval.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from cwa.analysis.base import AnalysisResult, AnalyzerOption, AnalyzerSpec, DisplayTable
from cwa.errors import InvalidInput

SCOPES = ("global", "layer", "component")
STATISTICS = ("overlap_frac", "jaccard", "rbo", "spearman", "kendall")


def group_sizes(arch: Any, names: list[str]) -> dict[tuple[str, str], int]:
    """Scored weights per (scope, group key) from the architecture map."""
    sizes: dict[tuple[str, str], int] = {}
    for name in names:
        info = arch.params[name]
        sizes[("global", "all")] = sizes.get(("global", "all"), 0) + info.numel
        if info.layer is not None:
            key = ("layer", f"layer={info.layer}")
            sizes[key] = sizes.get(key, 0) + info.numel
        for seg in info.segments:
            key = ("component", seg.component)
            sizes[key] = sizes.get(key, 0) + seg.numel(info.shape)
    return sizes


def _group_ks(sizes: dict, k_values: list, scopes: list[str]) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    for (scope, key), n in sizes.items():
        if scope not in scopes:
            continue
        ks = sorted({(kv.resolve(n), kv.label) for kv in k_values if kv.resolve(n) <= n})
        if ks:
            out[(scope, key)] = ks
    return out


def collect_topk(
    inputs: Any, arch: Any, names: list[str], group_ks: dict, reporter: Any
) -> list[dict[tuple[str, str], Any]]:
    """One lockstep pass over every run's score file: per run, a TrackedTopK per group.

    Each tensor is cut into its component blocks (one for a plain tensor; q/k/v of a fused
    one) and every block of every run is scanned once for the candidates of all its groups
    (global, its layer, its component): :func:`cwa.analysis.topk.block_candidates`.
    """
    from contextlib import ExitStack

    from cwa.analysis.topk import (
        TrackedTopK,
        as_float32,
        block_values,
        component_blocks,
        offer_block,
    )

    runs = inputs.runs
    params = list(arch.params)
    offsets = np.zeros(len(params), dtype=np.int64)
    offsets[1:] = np.cumsum([arch.params[p].numel for p in params])[:-1]
    trackers = [
        {
            g: TrackedTopK(max(k for k, _ in ks), len(runs) - 1, offsets)
            for g, ks in group_ks.items()
        }
        for _ in runs
    ]
    task = reporter.task("top-k of every run", total=len(names))
    with ExitStack() as stack:
        readers = [stack.enter_context(inputs.open_scores(run)) for run in runs]
        for name in names:
            info = arch.params[name]
            position = params.index(name)
            tensors = [as_float32(reader.get(name), info.shape) for reader in readers]
            flats = [t.numpy().reshape(-1) for t in tensors]
            blocks = component_blocks(arch, name)
            for r, mine in enumerate(tensors):
                others = [f for j, f in enumerate(flats) if j != r]
                for comp, spec in blocks:
                    groups = [("global", "all"), ("component", comp)]
                    if info.layer is not None:
                        groups.append(("layer", f"layer={info.layer}"))
                    present = [trackers[r][g] for g in groups if g in trackers[r]]
                    if present:
                        values, to_tensor = block_values(mine, spec)
                        values = values.numpy()
                        offer_block(present, values, to_tensor, offsets[position], others)
            for per_run in trackers:
                for tracker in per_run.values():
                    tracker.compact(slack=2)
            task.advance()
    task.close()
    return trackers


def compare_pair(top_a: Any, top_b: Any, a: int, b: int, k: int, p: float) -> dict[str, Any]:
    """Overlap, Jaccard, RBO, Spearman and Kendall of runs a and b at depth k in one group."""
    from scipy import stats

    from cwa.analysis.rbo import rbo

    ids_a, keys_a, pay_a = top_a.head(k)
    ids_b, keys_b, pay_b = top_b.head(k)
    k_eff = min(ids_a.size, ids_b.size)
    ids_a, keys_a, pay_a = ids_a[:k_eff], keys_a[:k_eff], pay_a[:k_eff]
    ids_b, keys_b, pay_b = ids_b[:k_eff], keys_b[:k_eff], pay_b[:k_eff]
    shared = np.intersect1d(ids_a, ids_b, assume_unique=True, return_indices=True)
    overlap = int(shared[0].size)
    union = 2 * k_eff - overlap
    # payload columns hold the other runs in run order, skipping the run itself
    col_b_in_a = b - (b > a)
    col_a_in_b = a - (a > b)
    only_b = np.ones(ids_b.size, dtype=bool)
    only_b[shared[2]] = False
    score_a = np.concatenate([keys_a, pay_b[only_b, col_a_in_b]]).astype(np.float64)
    score_b = np.concatenate([pay_a[:, col_b_in_a], keys_b[only_b]]).astype(np.float64)

    def finite(value: float) -> float | None:
        return float(value) if np.isfinite(value) else None

    spearman = kendall = None
    if score_a.size > 1 and np.ptp(score_a) > 0 and np.ptp(score_b) > 0:
        spearman = finite(stats.spearmanr(score_a, score_b).statistic)
        kendall = finite(stats.kendalltau(score_a, score_b).statistic)
    return {
        "k": k_eff,
        "overlap": overlap,
        "overlap_frac": overlap / k_eff if k_eff else 0.0,
        "jaccard": overlap / union if union else 0.0,
        "rbo": rbo(ids_a, keys_a, ids_b, keys_b, p, shared=shared),
        "rbo_p": p,
        "spearman": spearman,
        "kendall": kendall,
        "n_union": union,
    }


def bootstrap_ci(
    matrix: np.ndarray, n_boot: int, level: float, seed: int
) -> tuple[float | None, float | None]:
    """Percentile CI of the mean over pairs of distinct runs, resampling runs.

    ``matrix[i, j]`` is the pair statistic (symmetric, NaN on the diagonal and where unknown).
    """
    r = matrix.shape[0]
    if r < 3:
        return None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, r, size=(n_boot, r))
    sub = matrix[idx[:, :, None], idx[:, None, :]]
    upper = np.triu(np.ones((r, r), dtype=bool), 1)
    values = np.where(upper[None], sub, np.nan).reshape(n_boot, -1)
    counts = np.sum(~np.isnan(values), axis=1)
    keep = counts > 0
    if not keep.any():
        return None, None
    means = np.nansum(values[keep], axis=1) / counts[keep]
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _summaries(pair_rows: list[dict], n_runs: int, run_ids: list[str], options: dict) -> list[dict]:
    index = {run_id: i for i, run_id in enumerate(run_ids)}
    grouped: dict[tuple, list[dict]] = {}
    for row in pair_rows:
        grouped.setdefault((row["scope"], row["group_key"], row["k"], row["k_label"]), []).append(
            row
        )
    out = []
    for (scope, key, k, label), rows in grouped.items():
        for stat in STATISTICS:
            values = np.array([np.nan if r[stat] is None else r[stat] for r in rows], dtype=float)
            matrix = np.full((n_runs, n_runs), np.nan)
            for r, v in zip(rows, values, strict=True):
                i, j = index[r["run_a"]], index[r["run_b"]]
                matrix[i, j] = matrix[j, i] = v
            known = values[~np.isnan(values)]
            low, high = bootstrap_ci(
                matrix, options["n_boot"], options["ci_level"], options["seed"]
            )
            out.append(
                {
                    "scope": scope,
                    "group_key": key,
                    "k": k,
                    "k_label": label,
                    "statistic": stat,
                    "n_runs": n_runs,
                    "n_pairs": len(rows),
                    "mean": float(known.mean()) if known.size else None,
                    "std": float(known.std(ddof=1)) if known.size > 1 else None,
                    "min": float(known.min()) if known.size else None,
                    "max": float(known.max()) if known.size else None,
                    "ci_low": low,
                    "ci_high": high,
                    "ci_level": options["ci_level"] if low is not None else None,
                    "ci_method": "bootstrap_runs" if low is not None else None,
                }
            )
    return out


def _prepare(inputs: Any, options: dict) -> tuple[Any, list[str], dict, dict]:
    from cwa.analysis.common import common_names, total_scored

    arch = inputs.architecture(inputs.runs[0])
    names = common_names(inputs, inputs.runs, arch)
    scopes = options["scopes"]
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise InvalidInput(f"option scopes: unknown scope {unknown[0]!r}; use {', '.join(SCOPES)}")
    if not 0 < options["p"] < 1:
        raise InvalidInput(f"option p={options['p']}: RBO persistence must be between 0 and 1")
    sizes = group_sizes(arch, names)
    n_total = min(total_scored(inputs, run, names) for run in inputs.runs)
    for kv in options["k_values"]:
        k = kv.resolve(sizes[("global", "all")])
        if k > n_total:
            raise InvalidInput(
                f"k={kv.label} is larger than the ranking: the runs have {n_total} scored weights "
                "in common; use a smaller k"
            )
    return arch, names, sizes, _group_ks(sizes, options["k_values"], scopes)


def _validate(inputs: Any, options: dict) -> None:
    _prepare(inputs, options)


def _run(inputs: Any, options: dict, reporter: Any) -> AnalysisResult:
    arch, names, _sizes, group_ks = _prepare(inputs, options)
    trackers = collect_topk(inputs, arch, names, group_ks, reporter)
    runs = inputs.runs
    rows = []
    for a, b in combinations(range(len(runs)), 2):
        for group, ks in group_ks.items():
            for k, label in ks:
                row = compare_pair(trackers[a][group], trackers[b][group], a, b, k, options["p"])
                row.update(
                    run_a=runs[a].run_id,
                    run_b=runs[b].run_id,
                    scope=group[0],
                    group_key=group[1],
                    k_label=label,
                )
                rows.append(row)
    summary = _summaries(rows, len(runs), [r.run_id for r in runs], options)
    return _result(rows, summary)


def _result(rows: list[dict], summary: list[dict]) -> AnalysisResult:
    metrics = {}
    for s in summary:
        if s["scope"] == "global" and s["mean"] is not None:
            metrics[f"{s['statistic']}_at_{s['k_label'].replace('%', 'pct')}"] = s["mean"]
    display_rows = []
    for s in summary:
        if s["scope"] == "global":
            display_rows.append(
                (s["k_label"], s["statistic"], s["n_pairs"], s["mean"], s["ci_low"], s["ci_high"])
            )
    layer_rows = [
        (s["group_key"], s["k_label"], s["mean"], s["ci_low"], s["ci_high"])
        for s in summary
        if s["scope"] == "layer" and s["statistic"] == "jaccard"
    ]
    return AnalysisResult(
        tables={"analysis_stability": rows, "analysis_stability_summary": summary},
        metrics=metrics,
        display=[
            DisplayTable(
                "global agreement (mean over pairs)",
                ("k", "statistic", "pairs", "mean", "ci_low", "ci_high"),
                display_rows,
            ),
            DisplayTable(
                "jaccard per layer", ("layer", "k", "mean", "ci_low", "ci_high"), layer_rows
            ),
        ],
    )


ANALYZER = AnalyzerSpec(
    name="stability",
    version="1",
    description="top-k agreement of score runs (overlap, Jaccard, RBO, Spearman, Kendall) with CI",
    input_stages=("score",),
    run=_run,
    min_runs=2,
    max_runs=None,
    same_model=True,
    options=(
        AnalyzerOption(
            "k_values", "k_list", "100,1000,10000,0.1%", "k list; a % is of the group's weights"
        ),
        AnalyzerOption("p", "float", 0.99, "RBO persistence, 0 < p < 1"),
        AnalyzerOption(
            "scopes", "str_list", "global,layer,component", "groups: global, layer, component"
        ),
        AnalyzerOption("n_boot", "int", 1000, "bootstrap resamples of runs", minimum=100),
        AnalyzerOption("ci_level", "float", 0.95, "confidence level", minimum=0.5, maximum=0.999),
        AnalyzerOption("seed", "int", 0, "bootstrap seed"),
    ),
    tables=("analysis_stability", "analysis_stability_summary"),
    validate=_validate,
)
