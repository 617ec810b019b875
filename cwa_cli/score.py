"""``cwa score``: per-weight sensitivity scores (one run per seed)."""

from __future__ import annotations

from typing import Annotated

import typer

from cwa_cli._boundary import error_boundary
from cwa_cli._common import (
    command_line,
    mlflow_flag,
    open_store,
    print_choices,
    print_outcomes,
    reporter_for,
)
from cwa_cli._options import (
    BatchSizeOpt,
    ComponentsOpt,
    DataOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ExperimentLabelOpt,
    HeldoutFractionOpt,
    LayersOpt,
    ListOpt,
    ModelOpt,
    NSamplesOpt,
    SeqLenOpt,
    TextColumnOpt,
    TrustRemoteCodeOpt,
)


@error_boundary
def score_cmd(
    ctx: typer.Context,
    model: ModelOpt = "toy",
    metric: Annotated[
        str,
        typer.Option(
            "--metric", help="Sensitivity metric ('list' or --list shows them), or module:function."
        ),
    ] = "grad_x_weight",
    data: DataOpt = None,
    heldout_fraction: HeldoutFractionOpt = 0.1,
    text_column: TextColumnOpt = None,
    n_samples: NSamplesOpt = 32,
    seq_len: SeqLenOpt = 128,
    batch_size: BatchSizeOpt = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed (data sample, probes).")] = 0,
    seeds: Annotated[
        str | None,
        typer.Option("--seeds", help="Several seeds, e.g. '0,1,2' or '0-4': one run each."),
    ] = None,
    layers: LayersOpt = None,
    components: ComponentsOpt = None,
    probes: Annotated[
        int | None, typer.Option("--probes", help="Hutchinson probes (hutchinson_diag, obd).")
    ] = None,
    score_dtype: Annotated[
        str, typer.Option("--score-dtype", help="float32 or bfloat16 for stored scores.")
    ] = "float32",
    experiment: ExperimentLabelOpt = "default",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    metric_option: Annotated[
        list[str] | None,
        typer.Option(
            "--metric-option",
            help="Metric option KEY=VALUE, repeatable (e.g. spike_threshold=50, rounds=3 for "
            "super_weight; micro_batch_size=4 for grad_squared).",
        ),
    ] = None,
    activation_checkpointing: Annotated[
        bool,
        typer.Option(
            "--activation-checkpointing",
            help="Recompute decoder-block activations during backward: same scores, more "
            "compute; lowers peak memory for gradient metrics, hardly for the Hessian ones "
            "(hutchinson_diag, obd: use a smaller --batch-size).",
        ),
    ] = False,
    list_metrics: ListOpt = False,
) -> None:
    """Score every weight's sensitivity on calibration text; prints the run id(s).

    Examples:
      cwa score --model toy --metric grad_x_weight --seeds 0,1,2
      cwa score --model gpt2 --metric hutchinson_diag --probes 32 --data notes.txt
      cwa score --model gpt2 --metric hutchinson_diag --activation-checkpointing
      cwa score --model toy --metric wanda --components mlp_up,mlp_down --layers 0-1
    """
    if list_metrics or metric == "list":
        from cwa.metrics import list_metrics as available

        print_choices(ctx, available(), "metric")
        return
    from cwa.parsing import parse_int_list, parse_name_list, parse_seeds
    from cwa.stages.common import ModelOptions
    from cwa.stages.score import DataOptions, ScoreConfig, parse_metric_options, run_score

    config = ScoreConfig(
        model=ModelOptions(model, dtype, device, trust_remote_code, device_map),
        metric=metric,
        data=DataOptions(data, text_column, n_samples, seq_len, batch_size, heldout_fraction),
        seeds=parse_seeds(seeds, seed),
        layers=parse_int_list(layers, what="layer"),
        components=parse_name_list(components),
        probes=probes,
        score_dtype=score_dtype,
        options=parse_metric_options(metric_option),
        experiment=experiment,
        command=command_line(),
        activation_checkpointing=activation_checkpointing,
    )
    with reporter_for(ctx) as reporter:
        outcomes = run_score(open_store(ctx), config, reporter=reporter, mlflow=mlflow_flag(ctx))
    print_outcomes(ctx, outcomes)
