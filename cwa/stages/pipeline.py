"""Chained stages: ``cwa run`` (score -> rank -> evaluate -> perturb with the old system's flags)
and ``cwa demo`` (the same chain on the offline toy model). Every stage is still its own run in
the store, linked by lineage; the chain adds only exported files and a summary."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cwa.errors import InvalidInput
from cwa.lifecycle import RunOutcome
from cwa.progress import NULL_REPORTER, Reporter
from cwa.stages.common import ModelOptions
from cwa.stages.evaluate import EvaluateConfig, run_evaluate
from cwa.stages.perturb import PerturbConfig, run_perturb
from cwa.stages.pipeline_analysis import AnalysisSwitches
from cwa.stages.rank import RankConfig, run_rank
from cwa.stages.score import DataOptions, ScoreConfig, run_score
from cwa.store import Store


@dataclass
class PipelineConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    metric: str = "grad_x_weight"
    data: DataOptions = field(default_factory=DataOptions)
    topk: int = 100
    mode: str = "global"
    method: str = "sign_flip"
    scale: float | None = None
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    seeds: list[int] = field(default_factory=lambda: [0])
    tasks: str = "perplexity"
    limit: int | None = None
    probes: int | None = None
    out_dir: str | None = None
    experiment: str = "default"
    command: str | None = None
    k_values: list[int] | None = None  # several k: a damage curve (--advanced-perturbations)
    analyses: AnalysisSwitches = field(default_factory=AnalysisSwitches)


@dataclass
class PipelineResult:
    score: RunOutcome
    rank: RunOutcome
    evaluate: RunOutcome
    perturb: RunOutcome
    summary: dict[tuple[str, str, str], dict[str, float]]
    exported: list[Path]
    extra_scores: list[RunOutcome] = field(default_factory=list)  # further seeds
    extra_perturbs: list[RunOutcome] = field(default_factory=list)  # clustered perturbation
    analyses: list[RunOutcome] = field(default_factory=list)
    report: RunOutcome | None = None

    @property
    def run_ids(self) -> dict[str, str]:
        return {s: getattr(self, s).run_id for s in ("score", "rank", "evaluate", "perturb")}


def run_pipeline(
    store: Store,
    config: PipelineConfig,
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
    loaded: Any = None,
) -> PipelineResult:
    """Run the chain, loading the model once and handing it to every stage."""
    from cwa.evaluation.tasks import plan_tasks
    from cwa.metrics import get_metric
    from cwa.models.loading import load_model
    from cwa.stages.common import is_toy_ref
    from cwa.stages.pipeline_analysis import apply_switches, run_switched_analyses
    from cwa.stages.score import _DOUBLE_BACKWARD, calibration_texts

    reporter = reporter or NULL_REPORTER
    apply_switches(config)
    # Validate everything cheap before the first run is registered.
    get_metric(config.metric)
    plan_tasks(config.tasks, limit=config.limit, is_toy_model=is_toy_ref(config.model.ref))
    calibration_texts(config.data, config.model.ref)
    if config.mode != "global":
        raise InvalidInput(
            "cwa run perturbs a global ranking; use --mode global, or run "
            "cwa rank / cwa perturb separately for other modes"
        )
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise InvalidInput(f"--out-dir {out_dir} is a file; give a directory")
        out_dir.mkdir(parents=True, exist_ok=True)
    common = {"experiment": config.experiment, "command": config.command}
    if loaded is None:
        loaded = load_model(
            config.model.ref,
            dtype=config.model.dtype,
            device=config.model.device,
            trust_remote_code=config.model.trust_remote_code,
            attn_implementation="eager" if config.metric in _DOUBLE_BACKWARD else None,
            reporter=reporter,
            device_map=config.model.device_map,
        )
    reporter.info("[1/4] score")
    score, *extra_scores = run_score(
        store,
        ScoreConfig(
            model=config.model,
            metric=config.metric,
            data=config.data,
            # --temporal-stability scores every seed; otherwise the first seed only.
            seeds=config.seeds if config.analyses.temporal_stability else [config.seeds[0]],
            probes=config.probes,
            **common,
        ),
        reporter=reporter,
        mlflow=mlflow,
        loaded=loaded,
    )
    reporter.info(f"[2/4] rank (top {config.topk}, {config.mode})")
    export = str(out_dir / "top_weights.csv") if out_dir else None
    rank = run_rank(
        store,
        RankConfig(
            score_run=score.run_id,
            topk=config.topk,
            mode=config.mode,
            export=export,
            device=config.model.device,
            **common,
        ),
        reporter=reporter,
        mlflow=mlflow,
        loaded=loaded,
    )
    reporter.info("[3/4] evaluate the unperturbed model")
    evaluate = run_evaluate(
        store,
        EvaluateConfig(
            model=config.model,
            tasks=config.tasks,
            limit=config.limit,
            calibration_run=score.run_id,  # perplexity holds out the calibration text
            **common,
        ),
        reporter=reporter,
        mlflow=mlflow,
        loaded=loaded,
    )
    reporter.info(f"[4/4] perturb ({config.method}; controls {', '.join(config.controls)})")
    perturb = run_perturb(
        store,
        PerturbConfig(
            rank_run=rank.run_id,
            method=config.method,
            scales=None if config.scale is None else [config.scale],
            controls=config.controls,
            seeds=config.seeds,
            k_values=config.k_values,
            tasks=config.tasks,
            limit=config.limit,
            device=config.model.device,
            **common,
        ),
        reporter=reporter,
        mlflow=mlflow,
        loaded=loaded,
    )
    summary = perturb.value["summary"]
    exported: list[Path] = []
    if out_dir is not None:
        exported = _export(store, out_dir, config, perturb, score, rank, evaluate)
        if export:
            exported.insert(0, Path(export))
    analyses, extra_perturbs, report, written = run_switched_analyses(
        store,
        config,
        score_runs=[score.run_id, *[s.run_id for s in extra_scores]],
        rank=rank,
        perturb=perturb,
        reporter=reporter,
        mlflow=mlflow,
        loaded=loaded,
    )
    exported.extend(written)
    return PipelineResult(
        score, rank, evaluate, perturb, summary, exported, extra_scores, extra_perturbs,
        analyses, report,
    )


def _export(
    store: Store,
    out_dir: Path,
    config: PipelineConfig,
    perturb: RunOutcome,
    score: RunOutcome,
    rank: RunOutcome,
    evaluate: RunOutcome,
) -> list[Path]:
    from cwa.store.query import query

    effects = query(
        store,
        "SELECT * FROM perturbation_effects WHERE run_id = "
        f"'{perturb.run_id}' ORDER BY condition_id, task, metric",
    )
    effects_path = out_dir / "perturbation_results.csv"
    effects.write_csv(effects_path)
    stats = query(store, f"SELECT * FROM tensor_stats WHERE run_id = '{score.run_id}'")
    stats_path = out_dir / "sensitivity_stats.csv"
    stats.write_csv(stats_path)
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    manifest = {
        "store": str(store.path.resolve()),
        "runs": {
            "score": score.run_id,
            "rank": rank.run_id,
            "evaluate": evaluate.run_id,
            "perturb": perturb.run_id,
        },
        "files": ["top_weights.csv", effects_path.name, stats_path.name, config_path.name],
    }
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return [effects_path, stats_path, config_path, manifest_path]


def demo_config(
    *,
    experiment: str = "demo",
    seeds: list[int] | None = None,
    out_dir: str | None = None,
    command: str | None = None,
    topk: int | None = None,
    limit: int | None = 200,
) -> PipelineConfig:
    """The demo chain on the toy model (see DEMO_TOPK_FRACTION for how k is chosen)."""
    return PipelineConfig(
        model=ModelOptions("toy", "float32", "cpu", False),
        metric="grad_x_weight",
        data=DataOptions("toy", None, 32, 128, 8),
        topk=topk or 0,  # filled in by run_demo from the model size
        mode="global",
        method="sign_flip",
        controls=["random_k", "bottom_k"],
        seeds=seeds or [0, 1, 2],
        tasks="perplexity,hellaswag,lambada",
        limit=limit,
        out_dir=out_dir,
        experiment=experiment,
        command=command,
        # The demo ends with the depth/component profile and the report.
        analyses=AnalysisSwitches(architecture_analysis=True, save_plots=True),
    )


DEMO_TOPK_FRACTION = 0.0005  # 0.05% of the model's weights


def run_demo(
    store: Store,
    config: PipelineConfig,
    *,
    reporter: Reporter | None = None,
    mlflow: bool | None = None,
) -> PipelineResult:
    """Build (or reuse) the toy model, then run the chain with k = 0.05% of its weights."""
    from cwa.models.loading import load_model

    reporter = reporter or NULL_REPORTER
    loaded = load_model("toy", dtype="float32", device="cpu", reporter=reporter)
    if not config.topk:
        config.topk = max(1, round(loaded.arch.total_params * DEMO_TOPK_FRACTION))
    return run_pipeline(store, config, reporter=reporter, mlflow=mlflow, loaded=loaded)


def summary_dict(summary: dict[tuple[str, str, str], dict[str, float]]) -> list[dict[str, Any]]:
    return [{"selection": s, "task": t, "metric": m, **v} for (s, t, m), v in summary.items()]
