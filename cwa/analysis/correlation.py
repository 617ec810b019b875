"""``correlation``: metric x metric and layer x layer correlations, stored long-form.

**metric x metric** (two or more score runs of one model, e.g. ``grad_x_weight`` vs
``hutchinson_diag``), for every pair of runs (``row_key`` = run a, ``col_key`` = run b, a
before b in the order given):

- ``scope = 'tensor'``: Spearman and Kendall (tau-b) between the two runs' scores of one
  parameter on a seeded uniform sample of up to ``sample`` of its elements (the same elements
  in both runs; all of them when the tensor is smaller);
- ``scope = 'global'``: the same on a stratified uniform sample of ``global_sample`` weights of
  the whole model (each tensor contributes in proportion to its size), plus ``topk_overlap`` =
  |top_k(a) ∩ top_k(b)| / k of the exact global top-k (option ``k``, streaming merge).

Samples: tensor t (architecture position i) draws ``numpy.random.default_rng([seed, i])
.choice(n, m, replace=False)``; its first ``m_global`` draws form its part of the global sample
(a prefix of a uniform sample without replacement is one too). See :func:`sample_indices`.

**layer x layer** (every input run, ``group_key`` = the score run): each layer of the stack is
described by a vector, and ``pearson`` and ``spearman`` correlations between the vectors of
every two layers are stored (``row_key``/``col_key`` = ``layer=i``/``layer=j``, the full
symmetric matrix with its diagonal):

- ``scope = 'components'``: log10 of the mean |score| of each component present in every layer
  (q, k, v, o, MLP matrices, norms);
- ``scope = 'heads'``: each query head's share of the layer's attn_q |score| mass (models with
  more than one head).

Everything comes from one lockstep pass over the score files (one tensor of every run in memory).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from cwa.analysis.base import AnalysisResult, AnalyzerOption, AnalyzerSpec, DisplayTable


def sample_indices(n: int, m: int, seed: int, position: int) -> np.ndarray:
    """The seeded sample of tensor ``position`` (size n): m indices without replacement, in
    random order (so every prefix is a uniform sample too); a permutation of all n if m >= n."""
    rng = np.random.default_rng([seed, position])
    if m >= n:
        return rng.permutation(n)
    return rng.choice(n, size=m, replace=False)


def _rank_stats(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    from scipy import stats

    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    rho = stats.spearmanr(x, y).statistic
    tau = stats.kendalltau(x, y).statistic
    return (float(rho) if np.isfinite(rho) else None, float(tau) if np.isfinite(tau) else None)


class _LayerProfile:
    """Per run: |score| mass and count per (layer, component) and per (layer, query head)."""

    def __init__(self) -> None:
        self.comp: dict[tuple[int, str], list[float]] = {}
        self.heads: dict[int, np.ndarray] = {}

    def add(self, arch: Any, name: str, values: np.ndarray) -> None:
        from cwa.models.architecture import COMPONENTS

        info = arch.params[name]
        if info.layer is None:
            return
        mags = np.abs(values)
        mags = np.where(np.isnan(mags), 0.0, mags)
        ids = None
        if len(info.components) > 1:
            ids = arch.component_ids(name).numpy().reshape(-1).astype(np.int64)
            sums = np.bincount(ids, weights=mags, minlength=len(COMPONENTS))
            counts = np.bincount(ids, minlength=len(COMPONENTS))
            parts = {
                c: (sums[COMPONENTS.index(c)], counts[COMPONENTS.index(c)]) for c in info.components
            }
        else:
            parts = {info.components[0]: (float(mags.sum(dtype=np.float64)), mags.size)}
        for comp, (mass, count) in parts.items():
            slot = self.comp.setdefault((info.layer, comp), [0.0, 0])
            slot[0] += float(mass)
            slot[1] += int(count)
        if "attn_q" in info.components and arch.n_heads > 1:
            heads = arch.head_ids(name).numpy().reshape(-1).astype(np.int64)
            member = heads >= 0
            if ids is not None:
                member &= ids == COMPONENTS.index("attn_q")
            per_head = np.bincount(heads[member], weights=mags[member], minlength=arch.n_heads)
            self.heads[info.layer] = self.heads.get(info.layer, 0) + per_head[: arch.n_heads]

    def vectors(self, scope: str) -> dict[int, np.ndarray]:
        if scope == "heads":
            return {layer: v / v.sum() for layer, v in sorted(self.heads.items()) if v.sum() > 0}
        layers = sorted({layer for layer, _ in self.comp})
        comps = sorted({c for _, c in self.comp})
        shared = [c for c in comps if all((layer, c) in self.comp for layer in layers)]
        out = {}
        for layer in layers:
            means = np.array(
                [self.comp[(layer, c)][0] / max(self.comp[(layer, c)][1], 1) for c in shared]
            )
            out[layer] = np.log10(np.maximum(means, np.finfo(np.float64).tiny))
        return out


def layer_matrix_rows(profile: _LayerProfile, run_id: str) -> list[dict[str, Any]]:
    from scipy import stats

    rows = []
    for scope in ("components", "heads"):
        vectors = profile.vectors(scope)
        for i, vi in vectors.items():
            for j, vj in vectors.items():
                if vi.size < 3 or np.ptp(vi) == 0 or np.ptp(vj) == 0:
                    continue
                values = {
                    "pearson": float(np.corrcoef(vi, vj)[0, 1]),
                    "spearman": float(stats.spearmanr(vi, vj).statistic),
                }
                for stat, value in values.items():
                    rows.append(
                        {
                            "kind": "layer",
                            "scope": scope,
                            "group_key": run_id,
                            "row_key": f"layer={i}",
                            "col_key": f"layer={j}",
                            "statistic": stat,
                            "value": value,
                            "n": int(vi.size),
                        }
                    )
    return rows


def _validate(inputs: Any, options: dict) -> None:
    from cwa.analysis.common import common_names, total_scored
    from cwa.errors import InvalidInput

    names = common_names(inputs, inputs.runs, inputs.architecture(inputs.runs[0]))
    n_total = min(total_scored(inputs, run, names) for run in inputs.runs)
    if len(inputs.runs) > 1 and options["k"] > n_total:
        raise InvalidInput(
            f"k={options['k']} is larger than the ranking: the runs have {n_total} scored "
            "weights in common; use a smaller k"
        )


def _run(inputs: Any, options: dict, reporter: Any) -> AnalysisResult:
    from contextlib import ExitStack

    from cwa.analysis.common import common_names, read_scores
    from cwa.ranking import RunningTopK

    runs = inputs.runs
    arch = inputs.architecture(runs[0])
    names = common_names(inputs, runs, arch)
    params = list(arch.params)
    n_total = sum(arch.params[n].numel for n in names)
    pairs = list(combinations(range(len(runs)), 2))
    profiles = [_LayerProfile() for _ in runs]
    tops = [RunningTopK(options["k"]) for _ in runs]
    global_parts: list[list[np.ndarray]] = [[] for _ in runs]
    rows: list[dict[str, Any]] = []
    task = reporter.task("correlation", total=len(names))
    with ExitStack() as stack:
        readers = [stack.enter_context(inputs.open_scores(run)) for run in runs]
        for name in names:
            position = params.index(name)
            values = [read_scores(reader, name) for reader in readers]
            n = values[0].size
            m_global = round(options["global_sample"] * n / n_total)
            idx = sample_indices(n, max(options["sample"], m_global), options["seed"], position)
            sampled = [v[idx].astype(np.float64) for v in values]
            for r, v in enumerate(values):
                profiles[r].add(arch, name, v)
                global_parts[r].append(sampled[r][:m_global])
                valid = ~np.isnan(v) if np.isnan(v.max()) else None
                flats = None if valid is None else np.flatnonzero(valid)
                tops[r].offer(position, v if valid is None else v[flats], flats)
            m_tensor = min(options["sample"], n)
            for a, b in pairs:
                rho, tau = _rank_stats(sampled[a][:m_tensor], sampled[b][:m_tensor])
                for stat, value in (("spearman", rho), ("kendall", tau)):
                    rows.append(
                        _metric_row("tensor", name, runs[a], runs[b], stat, value, m_tensor)
                    )
            task.advance()
    task.close()
    for a, b in pairs:
        xa, xb = np.concatenate(global_parts[a]), np.concatenate(global_parts[b])
        rho, tau = _rank_stats(xa, xb)
        ids_a = set(zip(tops[a].positions.tolist(), tops[a].flats.tolist(), strict=True))
        ids_b = set(zip(tops[b].positions.tolist(), tops[b].flats.tolist(), strict=True))
        k = min(len(ids_a), len(ids_b))
        for stat, value, count in (
            ("spearman", rho, xa.size),
            ("kendall", tau, xa.size),
            ("topk_overlap", len(ids_a & ids_b) / k if k else None, k),
        ):
            rows.append(_metric_row("global", "all", runs[a], runs[b], stat, value, count))
    for run, profile in zip(runs, profiles, strict=True):
        rows.extend(layer_matrix_rows(profile, run.run_id))
    return _result(rows)


def _metric_row(scope, key, run_a, run_b, stat, value, n) -> dict[str, Any]:
    return {
        "kind": "metric",
        "scope": scope,
        "group_key": key,
        "row_key": run_a.run_id,
        "col_key": run_b.run_id,
        "statistic": stat,
        "value": value,
        "n": int(n),
    }


def _result(rows: list[dict[str, Any]]) -> AnalysisResult:
    metric_rows = [r for r in rows if r["kind"] == "metric" and r["scope"] == "global"]
    metrics = {}
    if len({(r["row_key"], r["col_key"]) for r in metric_rows}) == 1:
        metrics = {
            f"global_{r['statistic']}": r["value"] for r in metric_rows if r["value"] is not None
        }
    layer_means: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] == "layer" and r["statistic"] == "pearson" and r["row_key"] != r["col_key"]:
            layer_means.setdefault(r["scope"], []).append(r["value"])
    for scope, values in layer_means.items():
        metrics[f"mean_layer_pearson_{scope}"] = float(np.mean(values))
    display = [
        (r["row_key"], r["col_key"], r["statistic"], r["value"], r["n"]) for r in metric_rows
    ]
    layer_display = [
        (r["group_key"], r["row_key"], r["col_key"], r["value"])
        for r in rows
        if r["kind"] == "layer"
        and r["scope"] == "components"
        and r["statistic"] == "pearson"
        and r["row_key"] < r["col_key"]
    ]
    return AnalysisResult(
        tables={"analysis_correlation": rows},
        metrics=metrics,
        display=[
            DisplayTable(
                "metric agreement (global)", ("run_a", "run_b", "statistic", "value", "n"), display
            ),
            DisplayTable(
                "layer x layer (component profile, pearson)",
                ("score_run", "layer_a", "layer_b", "pearson"),
                layer_display,
            ),
        ],
    )


ANALYZER = AnalyzerSpec(
    name="correlation",
    version="1",
    description="metric x metric rank correlation and top-k overlap; layer x layer correlation",
    input_stages=("score",),
    run=_run,
    min_runs=1,
    max_runs=None,
    same_model=True,
    options=(
        AnalyzerOption("sample", "int", 10000, "sampled weights per tensor", minimum=10),
        AnalyzerOption(
            "global_sample", "int", 100000, "stratified sample of the model", minimum=10
        ),
        AnalyzerOption("k", "int", 1000, "global top-k for the overlap", minimum=1),
        AnalyzerOption("seed", "int", 0, "sampling seed"),
    ),
    tables=("analysis_correlation",),
    validate=_validate,
)
