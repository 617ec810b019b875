"""The report's text: findings stated in numbers, and the provenance of every run shown.

Every number here comes from a query of the store's rows (perturbation_effects, tensor_stats,
ranked_weights, runs); nothing is recomputed from the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cwa.reporting.build import store_tables
from cwa.reporting.runset import RunSet
from cwa.reporting.style import component_label
from cwa.store.store import Store

_VERBS = {
    "zero": "zeroing",
    "sign_flip": "sign-flipping",
    "scale": "scaling ({scale:g}×)",
    "gaussian_noise": "adding Gaussian noise ({scale:g} std) to",
    "bit_flip": "flipping a bit of",
}


@dataclass
class Finding:
    text: str
    sql: str


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    magnitude = abs(value)
    if magnitude == 0:
        return "0.00"
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if magnitude < 0.01 else f"{value:.2f}"


def _pct(share: float) -> str:
    return f"{share * 100:.2g}%" if share < 0.01 else f"{share * 100:.1f}%"


def _verb(method: str, scale: float | None) -> str:
    template = _VERBS.get(method, f"applying {method} to")
    return template.format(scale=scale if scale is not None else float("nan"))


def perturbation_findings(con: Any, runs: RunSet) -> list[Finding]:
    perturbs = runs.ids("perturb")
    if not perturbs:
        return []
    ids = ", ".join(f"'{i}'" for i in perturbs)
    sql = f"""WITH main AS (
    SELECT method, scale, k FROM perturbation_conditions
    WHERE run_id IN ({ids}) AND selection = 'top_k'
    ORDER BY k DESC, scale DESC NULLS FIRST LIMIT 1
)
SELECT e.selection, e.method, e.scale, e.k, e.task, e.metric, count(*) AS n,
       avg(e.ratio) AS mean_ratio, stddev_samp(e.ratio) AS std_ratio,
       avg(e.value) AS mean_value, stddev_samp(e.value) AS std_value,
       any_value(e.baseline) AS baseline
FROM perturbation_effects e
JOIN main m ON e.method = m.method AND e.k = m.k AND e.scale IS NOT DISTINCT FROM m.scale
WHERE e.run_id IN ({ids}) AND e.metric IN ('perplexity', 'acc')
GROUP BY ALL
ORDER BY e.task, e.metric, e.selection"""
    rows = con.execute(sql).fetchall()
    if not rows:
        return []
    total = None
    if runs.score_run:
        total = con.execute(
            "SELECT sum(numel) FROM tensor_stats WHERE run_id = ?", [runs.score_run]
        ).fetchone()[0]
    findings = []
    by_metric: dict[tuple[str, str], dict[str, tuple]] = {}
    for row in rows:
        by_metric.setdefault((row[4], row[5]), {})[row[0]] = row
    # Perplexity first (the headline), the language-modelling set before downstream tasks.
    order = sorted(by_metric, key=lambda tm: (tm[1] != "perplexity", tm[0] != "perplexity", tm))
    for task, metric in order:
        selections = by_metric[(task, metric)]
        top = selections.get("top_k")
        if top is None:
            continue
        _, method, scale, k, *_ = top
        share = f" ({_pct(k / total)} of {total:,} scored)" if total else ""
        head = f"{_verb(method, scale)} the top {k:,} weights{share}"
        controls = []
        order = ("random_k", "bottom_k", "all_k")
        for selection in sorted(selections, key=lambda s: (order + (s,)).index(s)):
            if selection == "top_k":
                continue
            row = selections[selection]
            n, mean_r, std_r, mean_v, std_v = row[6], row[7], row[8], row[9], row[10]
            value, spread = (mean_r, std_r) if metric == "perplexity" else (mean_v, std_v)
            seeds = f"{n} {selection} sets of the same size" if n > 1 else selection
            spread_text = f" ± {_fmt(spread)}" if n > 1 and spread is not None else ""
            controls.append(f"{seeds}: {_fmt(value)}{spread_text}")
        tail = ("; " + "; ".join(controls)) if controls else ""
        if metric == "perplexity":
            label = "perplexity" if task == "perplexity" else f"{task} perplexity"
            text = f"{head} multiplies {label} by {_fmt(top[7])}{tail}."
        else:
            text = (
                f"{head} takes {task} {metric} from {_fmt(top[11])} to {_fmt(top[9])}{tail}."
            )
        findings.append(Finding(text=text[0].upper() + text[1:], sql=sql))
    return findings


def cluster_findings(con: Any, runs: RunSet) -> list[Finding]:
    """Clustered perturbations (treatment ``cluster:ID``) against random_k of the same size."""
    perturbs = runs.ids("perturb")
    if not perturbs:
        return []
    ids = ", ".join(f"'{i}'" for i in perturbs)
    sql = f"""WITH treated AS (
    SELECT run_id, selection, method, scale, k, ratio FROM perturbation_effects
    WHERE run_id IN ({ids}) AND selection LIKE 'cluster:%'
      AND task = 'perplexity' AND metric = 'perplexity'
), controls AS (
    SELECT run_id, method, scale, k, avg(ratio) AS mean_ratio,
           stddev_samp(ratio) AS std_ratio, count(*) AS n
    FROM perturbation_effects
    WHERE run_id IN ({ids}) AND selection = 'random_k'
      AND task = 'perplexity' AND metric = 'perplexity'
    GROUP BY ALL
)
SELECT t.selection, t.method, t.scale, t.k, t.ratio, c.mean_ratio, c.std_ratio, c.n
FROM treated t
LEFT JOIN controls c ON c.run_id = t.run_id AND c.method = t.method
    AND c.scale IS NOT DISTINCT FROM t.scale AND c.k = t.k
ORDER BY t.selection"""
    found = []
    for selection, method, scale, k, ratio, mean, std, n in con.execute(sql).fetchall():
        label = "cluster " + selection.replace("/", ":").rsplit(":", 1)[-1]
        text = f"{_verb(method, scale)} {label} ({k:,} weights) multiplies perplexity by " \
            f"{_fmt(ratio)}"
        if n:
            spread = f" ± {_fmt(std)}" if n > 1 and std is not None else ""
            text += f"; {n} random_k sets of the same size: {_fmt(mean)}{spread}"
        found.append(Finding(text=text[0].upper() + text[1:] + ".", sql=sql))
    return found


def effect_findings(con: Any, runs: RunSet) -> list[Finding]:
    """Effect sizes of the treatment against each control (the effects analyzer's rows)."""
    analyses = runs.ids("analyze")
    if not analyses or "analysis_effects" not in store_tables(con):
        return []
    ids = ", ".join(f"'{i}'" for i in analyses)
    sql = f"""WITH newest AS (
    SELECT max(run_id) AS run_id FROM analysis_effects WHERE run_id IN ({ids})
), main AS (
    SELECT max(k) AS k FROM analysis_effects
    WHERE run_id = (SELECT run_id FROM newest) AND treatment = 'top_k'
)
SELECT control, n_control, task, difference, ci_low, ci_high, ci_level, z
FROM analysis_effects
WHERE run_id = (SELECT run_id FROM newest) AND treatment = 'top_k'
  AND k = (SELECT k FROM main) AND task = 'perplexity' AND metric = 'perplexity'
ORDER BY control"""
    found = []
    for control, n, _task, diff, lo, hi, level, z in con.execute(sql).fetchall():
        if diff is None:
            continue
        text = f"Against {control} ({n} seed{'s' if n != 1 else ''}), the top-k raises " \
            f"perplexity by {_fmt(diff)} more"
        if lo is not None and hi is not None:
            text += f" ({(level or 0.95) * 100:.0f}% interval {_fmt(lo)} to {_fmt(hi)}"
            text += f"; z = {_fmt(z)})" if z is not None else ")"
        found.append(Finding(text=text + ".", sql=sql))
    return found


def score_findings(con: Any, runs: RunSet) -> list[Finding]:
    if runs.score_run is None:
        return []
    findings = []
    sql = f"""SELECT component, sum(sum) / (SELECT sum(sum) FROM tensor_stats
    WHERE run_id = '{runs.score_run}') AS mass_share, sum(numel) AS numel
FROM tensor_stats WHERE run_id = '{runs.score_run}'
GROUP BY component ORDER BY mass_share DESC"""
    rows = con.execute(sql).fetchall()
    total = sum(r[2] for r in rows)
    if rows and total and rows[0][1] is not None:
        component, share, numel = rows[0]
        findings.append(
            Finding(
                text=f"{component_label(component)} holds {_pct(share)} of the "
                f"{runs.score_metric or 'score'} mass with {_pct(numel / total)} of the weights.",
                sql=sql,
            )
        )
    if runs.rank_run is not None:
        rank_sql = f"""SELECT component, count(*) AS n, count(*) / sum(count(*)) OVER () AS share
FROM ranked_weights WHERE run_id = '{runs.rank_run}'
GROUP BY component ORDER BY n DESC"""
        rows = con.execute(rank_sql).fetchall()
        if rows:
            parts = ", ".join(f"{component_label(c)} {_pct(s)}" for c, _, s in rows[:3])
            n = sum(r[1] for r in rows)
            findings.append(Finding(text=f"The {n:,} ranked weights sit in: {parts}.",
                                    sql=rank_sql))
    return findings


def findings(store: Store, runs: RunSet) -> list[Finding]:
    with store.read() as con:
        return (
            perturbation_findings(con, runs)
            + cluster_findings(con, runs)
            + effect_findings(con, runs)
            + score_findings(con, runs)
        )


def provenance(runs: RunSet) -> list[dict[str, Any]]:
    """One row per run: what ran, on what, with which seed, versions and command."""
    rows = []
    for run in runs.runs:
        config = run.config or {}
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        calibration = config.get("calibration")
        if isinstance(calibration, dict):  # the resolved source (path and sha256) when recorded
            source = calibration.get("path") or calibration.get("source") or ""
            digest = str(calibration.get("sha256") or "")[:12]
            data = {"source": f"{source} (sha256 {digest})" if digest else source}
        versions = run.versions or {}
        rows.append(
            {
                "run_id": run.run_id,
                "stage": run.stage,
                "experiment": run.experiment,
                "model": run.model_ref or "",
                "fingerprint": (run.model_fingerprint or "")[:16],
                "seed": "" if run.seed is None else run.seed,
                "calibration": data.get("source", "") if data else "",
                "created": run.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")
                if run.created_at
                else "",
                "duration_s": f"{run.duration_s:.1f}" if run.duration_s is not None else "",
                "versions": ", ".join(
                    f"{k} {versions[k]}"
                    for k in ("python", "torch", "transformers", "duckdb")
                    if k in versions
                ),
                "cwa": run.cwa_version,
                "git": (run.git_sha or "")[:10],
                "command": run.command or "",
                "parents": ", ".join(f"{p} ({role})" for p, role in run.parents),
            }
        )
    return rows
