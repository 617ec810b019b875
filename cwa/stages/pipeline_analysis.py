"""The analysis switches of ``cwa run`` (the original runner's flags) and what they run.

After score -> rank -> evaluate -> perturb, the switches add analyze runs and a report run, each
its own run in the store with lineage:

* ``--architecture-analysis``: the ``profile`` analyzer (distribution per layer, component,
  head; depth trend) of the score run;
* ``--weight-analysis``: the ``clusters`` and ``correlation`` analyzers of the score run(s);
* ``--temporal-stability``: one score run per ``--seeds`` seed (calibration sample and probes
  differ), then the ``stability`` analyzer over them (needs two or more seeds);
* ``--downstream-tasks``: adds HellaSwag and LAMBADA to ``--tasks``;
* ``--advanced-perturbations``: a k-curve (k/100, k/10, k) instead of one k, and a clustered
  perturbation (the largest cluster of a ``clusters`` analysis as the treatment, random_k
  controls of the same size), followed by the ``effects`` analyzer;
* ``--save-plots``: the report (figures + report.html); ``--out-dir`` implies it.

With ``--out-dir`` the report's ``report.html`` and ``plots/`` and every analysis table (as
``analysis/<table>.csv``) are written there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwa.errors import UsageError
from cwa.lifecycle import RunOutcome
from cwa.progress import Reporter
from cwa.store import Store

DOWNSTREAM_TASKS = ("hellaswag", "lambada")


@dataclass
class AnalysisSwitches:
    weight_analysis: bool = False
    architecture_analysis: bool = False
    temporal_stability: bool = False
    downstream_tasks: bool = False
    advanced_perturbations: bool = False
    save_plots: bool = False

    @property
    def analyzes(self) -> bool:
        return (
            self.weight_analysis
            or self.architecture_analysis
            or self.temporal_stability
            or self.advanced_perturbations
            or self.downstream_tasks
        )


def apply_switches(config: Any) -> None:
    """Fold the switches into the pipeline config (tasks, k values); checks before any run."""
    switches: AnalysisSwitches = config.analyses
    if switches.downstream_tasks:
        tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
        config.tasks = ",".join(dict.fromkeys([*tasks, *DOWNSTREAM_TASKS]))
    if switches.temporal_stability and len(config.seeds) < 2:
        raise UsageError(
            "--temporal-stability compares score runs of several seeds; give --seeds with at "
            "least two, e.g. --seeds 0,1,2"
        )
    if switches.advanced_perturbations and config.k_values is None and config.topk >= 1:
        k = config.topk
        config.k_values = sorted({max(1, k // 100), max(1, k // 10), k})


def _analyze(
    store: Store, name: str, runs: list[str], options: dict[str, Any], common: dict[str, Any],
    reporter: Reporter, mlflow: bool | None,
) -> RunOutcome:
    from cwa.stages.analyze import AnalyzeConfig, run_analyze

    reporter.info(f"analyze: {name}")
    config = AnalyzeConfig(
        analyzer=name,
        runs=runs,
        options={k: str(v) for k, v in options.items()},
        experiment=common["experiment"],
        command=common["command"],
    )
    return run_analyze(store, config, reporter=reporter, mlflow=mlflow)


def run_switched_analyses(
    store: Store,
    config: Any,
    *,
    score_runs: list[str],
    rank: RunOutcome,
    perturb: RunOutcome,
    reporter: Reporter,
    mlflow: bool | None,
    loaded: Any,
) -> tuple[list[RunOutcome], list[RunOutcome], RunOutcome | None, list[Path]]:
    """Run what the switches ask after the main chain.

    Returns (analyze outcomes, extra perturb outcomes, report outcome or None, files written).
    """
    switches: AnalysisSwitches = config.analyses
    common = {"experiment": config.experiment, "command": config.command}
    analyses: list[RunOutcome] = []
    perturbs: list[RunOutcome] = []
    score = score_runs[0]
    if switches.architecture_analysis:
        # No rank_run option: the report draws the top-k composition from ranked_weights, and
        # profile's top-k counts fail on a top-k without attention heads (reported to issue 11).
        analyses.append(_analyze(store, "profile", [score], {}, common, reporter, mlflow))
    clusters = None
    if switches.weight_analysis or switches.advanced_perturbations:
        clusters = _analyze(store, "clusters", [score], {}, common, reporter, mlflow)
        analyses.append(clusters)
    if switches.weight_analysis:
        analyses.append(_analyze(store, "correlation", score_runs, {}, common, reporter, mlflow))
    if switches.temporal_stability:
        analyses.append(_analyze(store, "stability", score_runs, {}, common, reporter, mlflow))
    if switches.advanced_perturbations and clusters is not None:
        cluster_id = _largest_cluster(store, clusters.run_id)
        if cluster_id is not None:
            perturbs.append(_clustered_perturbation(store, config, rank, clusters.run_id,
                                                    cluster_id, reporter, mlflow, loaded))
    if switches.analyzes:
        shown = [perturb.run_id, *[p.run_id for p in perturbs]]
        analyses.append(_analyze(store, "effects", shown, {}, common, reporter, mlflow))
    report = None
    written: list[Path] = []
    out_dir = Path(config.out_dir) if config.out_dir else None
    if switches.save_plots or out_dir is not None:
        from cwa.stages.report import ReportConfig, run_report

        reporter.info("report")
        shown = [perturb.run_id, *[p.run_id for p in perturbs], *score_runs,
                 *[a.run_id for a in analyses]]
        report = run_report(
            store,
            ReportConfig(runs=shown, out=str(out_dir) if out_dir else None,
                         command=config.command),
            reporter=reporter,
            mlflow=mlflow,
        )
        if out_dir is not None:
            written.append(out_dir / "report.html")
            written.append(out_dir / "plots")
    if out_dir is not None and analyses:
        written.extend(export_analysis_tables(store, [a.run_id for a in analyses],
                                              out_dir / "analysis"))
    return analyses, perturbs, report, written


def _largest_cluster(store: Store, clusters_run: str) -> int | None:
    with store.read() as con:
        row = con.execute(
            "SELECT cluster_id FROM analysis_clusters WHERE run_id = ? AND NOT is_noise "
            "ORDER BY size DESC, cluster_id LIMIT 1",
            [clusters_run],
        ).fetchone()
    return None if row is None else int(row[0])


def _clustered_perturbation(
    store: Store, config: Any, rank: RunOutcome, clusters_run: str, cluster_id: int,
    reporter: Reporter, mlflow: bool | None, loaded: Any,
) -> RunOutcome:
    from cwa.stages.perturb import PerturbConfig, run_perturb

    reporter.info(f"perturb: cluster {cluster_id} against random_k of the same size")
    return run_perturb(
        store,
        PerturbConfig(
            rank_run=rank.run_id,
            method=config.method,
            scales=None if config.scale is None else [config.scale],
            treatment=f"cluster:{clusters_run}/{cluster_id}",
            controls=["random_k"],
            seeds=config.seeds,
            tasks=config.tasks,
            limit=config.limit,
            device=config.model.device,
            experiment=config.experiment,
            command=config.command,
        ),
        reporter=reporter,
        mlflow=mlflow,
        loaded=loaded,
    )


def export_analysis_tables(store: Store, analyze_runs: list[str], folder: Path) -> list[Path]:
    """Every analysis table row of these analyze runs as ``folder/<table>.csv``."""
    from cwa.store.runs import result_tables

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    quoted = ", ".join(f"'{run_id}'" for run_id in analyze_runs)  # ids read from the store
    with store.read() as con:
        tables = [t for t in result_tables(con) if t.startswith("analysis_")]
        for table in sorted(tables):
            frame = con.sql(f'SELECT * FROM "{table}" WHERE run_id IN ({quoted})').pl()
            if frame.height:
                path = folder / f"{table}.csv"
                _write_csv(frame, path)
                written.append(path)
    return written


def _write_csv(frame: Any, path: Path) -> None:
    import polars as pl

    # CSV has no nested types: lists and structs become JSON text.
    nested = [c for c, t in frame.schema.items() if isinstance(t, pl.List | pl.Struct | pl.Array)]
    if nested:
        frame = frame.with_columns(
            [pl.col(c).map_elements(_json, return_dtype=pl.String) for c in nested]
        )
    frame.write_csv(path)


def _json(value: Any) -> str:
    import json

    return json.dumps(value.to_list() if hasattr(value, "to_list") else value, default=str)
