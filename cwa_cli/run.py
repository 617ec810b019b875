"""``cwa run``: score -> rank -> evaluate -> perturb in one command (the old system's flags)."""

from __future__ import annotations

from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import command_line, mlflow_flag, open_store, reporter_for
from cwa_cli._options import (
    BatchSizeOpt,
    DataOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ExperimentLabelOpt,
    ModelOpt,
    NSamplesOpt,
    SeqLenOpt,
    TextColumnOpt,
    TrustRemoteCodeOpt,
)
from cwa_cli._state import state
from cwa_cli.perturb import print_damage_table


@error_boundary
def run_cmd(
    ctx: typer.Context,
    model: ModelOpt = "toy",
    metric: Annotated[str, typer.Option("--metric", help="Sensitivity metric.")] = "grad_x_weight",
    topk: Annotated[int, typer.Option("--topk", "-k", help="Weights to rank and perturb.")] = 100,
    mode: Annotated[str, typer.Option("--mode", help="Ranking mode (global).")] = "global",
    perturb: Annotated[str, typer.Option("--perturb", help="Perturbation method.")] = "sign_flip",
    perturb_scale: Annotated[
        float | None, typer.Option("--perturb-scale", help="Scale for scale / gaussian_noise.")
    ] = None,
    controls: Annotated[
        str, typer.Option("--controls", help="Control selections.")
    ] = "random_k,bottom_k",
    seeds: Annotated[
        str,
        typer.Option(
            "--seeds", help="Seeds of the random controls (the first also seeds scoring)."
        ),
    ] = "0",
    tasks: Annotated[str, typer.Option("--tasks", help="Evaluation tasks.")] = "perplexity",
    limit: Annotated[int | None, typer.Option("--limit", help="Items per task.")] = None,
    probes: Annotated[int | None, typer.Option("--probes", help="Hutchinson probes.")] = None,
    out_dir: Annotated[
        str | None,
        typer.Option(
            "--out-dir",
            help="Also write top_weights.csv, results, a manifest, plots/, report.html and the "
            "analysis tables (analysis/*.csv) here.",
        ),
    ] = None,
    data: DataOpt = None,
    text_column: TextColumnOpt = None,
    n_samples: NSamplesOpt = 32,
    seq_len: SeqLenOpt = 128,
    batch_size: BatchSizeOpt = 8,
    experiment: ExperimentLabelOpt = "default",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    k_values: Annotated[
        str | None,
        typer.Option("--k-values", help="Several k for a damage curve, e.g. '10,100,1000'."),
    ] = None,
    weight_analysis: Annotated[
        bool,
        typer.Option(
            "--weight-analysis",
            help="Weight analysis: the clusters and correlation analyzers of the score run(s).",
        ),
    ] = False,
    architecture_analysis: Annotated[
        bool,
        typer.Option(
            "--architecture-analysis",
            help="Architecture analysis: the profile analyzer (per layer, component, head; "
            "depth trend).",
        ),
    ] = False,
    temporal_stability: Annotated[
        bool,
        typer.Option(
            "--temporal-stability",
            help="Score once per --seeds seed and run the stability analyzer over them "
            "(top-k overlap, Jaccard, RBO with intervals).",
        ),
    ] = False,
    downstream_tasks: Annotated[
        bool,
        typer.Option("--downstream-tasks", help="Add hellaswag and lambada to --tasks."),
    ] = False,
    advanced_perturbations: Annotated[
        bool,
        typer.Option(
            "--advanced-perturbations",
            help="A k-curve (k/100, k/10, k) and a clustered perturbation (largest cluster "
            "vs random_k of its size), then the effects analyzer.",
        ),
    ] = False,
    save_plots: Annotated[
        bool,
        typer.Option(
            "--save-plots",
            help="Write the report (figures + report.html) as a report run; implied by --out-dir.",
        ),
    ] = False,
) -> None:
    """Run the whole chain; each stage is still its own run in the store.

    The original runner's switches map onto analyze runs and the report run.

    Example:
      cwa run --model gpt2 --metric grad_x_weight --topk 100 --perturb sign_flip \\
          --controls random_k,bottom_k --seeds 0,1,2 --tasks perplexity --out-dir results/gpt2
      cwa run --model gpt2 --metric grad_x_weight --topk 100 --seeds 0,1,2 --weight-analysis \\
          --architecture-analysis --temporal-stability --downstream-tasks \\
          --advanced-perturbations --save-plots --out-dir results/gpt2
    """
    from cwa.parsing import parse_int_list, parse_name_list, parse_seeds
    from cwa.stages.common import ModelOptions
    from cwa.stages.pipeline import PipelineConfig, run_pipeline
    from cwa.stages.pipeline_analysis import AnalysisSwitches
    from cwa.stages.score import DataOptions

    config = PipelineConfig(
        model=ModelOptions(model, dtype, device, trust_remote_code, device_map),
        metric=metric,
        data=DataOptions(data, text_column, n_samples, seq_len, batch_size),
        topk=topk,
        mode=mode,
        method=perturb,
        scale=perturb_scale,
        controls=parse_name_list(controls) or [],
        seeds=parse_seeds(seeds),
        tasks=tasks,
        limit=limit,
        probes=probes,
        out_dir=out_dir,
        experiment=experiment,
        command=command_line(),
        k_values=parse_int_list(k_values, what="k"),
        analyses=AnalysisSwitches(
            weight_analysis=weight_analysis,
            architecture_analysis=architecture_analysis,
            temporal_stability=temporal_stability,
            downstream_tasks=downstream_tasks,
            advanced_perturbations=advanced_perturbations,
            save_plots=save_plots,
        ),
    )
    with reporter_for(ctx) as reporter:
        result = run_pipeline(open_store(ctx), config, reporter=reporter, mlflow=mlflow_flag(ctx))
    report(ctx, result)


def report(ctx: typer.Context, result) -> None:
    from cwa.stages.pipeline import summary_dict

    if state(ctx).json:
        _output.emit_json(
            {
                "runs": result.run_ids,
                "extra_scores": [o.run_id for o in result.extra_scores],
                "extra_perturbs": [o.run_id for o in result.extra_perturbs],
                "analyses": [o.run_id for o in result.analyses],
                "report": report_path(result),
                "summary": summary_dict(result.summary),
                "exported": [str(p) for p in result.exported],
            }
        )
        return
    for stage, run_id in result.run_ids.items():
        print(f"{stage}\t{run_id}")
    for outcome in [*result.extra_scores, *result.extra_perturbs, *result.analyses]:
        print(f"{outcome.stage}\t{outcome.run_id}")
    if result.report is not None:
        print(f"report\t{result.report.run_id}\t{report_path(result)}")
    print_damage_table(
        result.summary,
        to_stdout=True,
        title=f"damage per selection (perturb run {result.perturb.run_id})",
    )
    if result.exported:
        _output.info(
            "Exported: " + ", ".join(str(p) for p in result.exported), quiet=state(ctx).quiet
        )


def report_path(result) -> str | None:
    """Where report.html is: the --out-dir copy if any, else the report run's artifact."""
    if result.report is None:
        return None
    value = result.report.value or {}
    return str(value.get("out_report") or value.get("report"))
