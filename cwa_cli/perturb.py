"""``cwa perturb``: in-place perturbation of ranked weights against matched controls."""

from __future__ import annotations

from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import (
    command_line,
    mlflow_flag,
    open_store,
    print_choices,
    print_outcomes,
    reporter_for,
)
from cwa_cli._options import ComponentsOpt, DeviceMapOpt, DeviceOpt, LayersOpt, ListOpt
from cwa_cli._state import state


@error_boundary
def perturb_cmd(
    ctx: typer.Context,
    rank_run: Annotated[
        str, typer.Argument(help="Rank run id, prefix, or 'latest' (the newest rank run).")
    ] = "latest",
    method: Annotated[
        str, typer.Option("--method", help="zero, sign_flip, scale, gaussian_noise or bit_flip.")
    ] = "sign_flip",
    scale: Annotated[
        float | None,
        typer.Option(
            "--scale", help="Factor for scale; noise level (x tensor std) for gaussian_noise."
        ),
    ] = None,
    scales: Annotated[
        str | None,
        typer.Option("--scales", help="Several scales for a damage curve, e.g. '0.5,1,2'."),
    ] = None,
    bit: Annotated[
        int | None,
        typer.Option("--bit", help="Bit to flip (bit_flip; default: the top exponent bit)."),
    ] = None,
    controls: Annotated[
        str,
        typer.Option(
            "--controls",
            help="Control selections: random_k, bottom_k, all_k, NAME:PARAM or a module:attr "
            "plugin ('' for none). random_k/bottom_k match the treatment's count in every "
            "group of the rank mode.",
        ),
    ] = "random_k,bottom_k",
    treatment: Annotated[
        str,
        typer.Option("--treatment", help="The treatment selection (default top_k), or NAME:PARAM."),
    ] = "top_k",
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds for random controls / noise.")] = "0",
    k_values: Annotated[
        str | None,
        typer.Option(
            "--k-values",
            help="Numbers of weights for a progressive sweep, e.g. '10,100,1000', or "
            "fractions of a pruning-scale ranking (cwa rank --topk N%), e.g. '10%,30%,50%'.",
        ),
    ] = None,
    layers: LayersOpt = None,
    components: ComponentsOpt = None,
    heads: Annotated[
        str | None,
        typer.Option(
            "--heads",
            help="Only these attention head groups, LAYER.J, e.g. '3.1,5.0': key-value head J "
            "with the query heads that read it (the head itself without GQA), as in rank "
            "--mode head.",
        ),
    ] = None,
    tasks: Annotated[
        str,
        typer.Option(
            "--eval", "--tasks", help="Tasks after each condition, e.g. 'perplexity,lambada'."
        ),
    ] = "perplexity",
    limit: Annotated[int | None, typer.Option("--limit", help="Items per task.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Evaluation batch size.")] = 16,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    experiment: Annotated[
        str | None, typer.Option("--experiment", "-e", help="Label (default: the rank run's).")
    ] = None,
    no_items: Annotated[
        bool, typer.Option("--no-items", help="Do not store per-item records.")
    ] = False,
    no_layer_reuse: Annotated[
        bool,
        typer.Option(
            "--no-layer-reuse",
            help="Compute every condition's hidden states in full (by default the states "
            "below the scope's lowest layer are computed once for the sweep; same numbers).",
        ),
    ] = False,
    layer_reuse_budget: Annotated[
        float,
        typer.Option(
            "--layer-reuse-budget",
            help="GiB the reused hidden states may take; over it, no reuse.",
        ),
    ] = 4.0,
    list_methods: ListOpt = False,
) -> None:
    """Perturb the top-k weights of a rank run and matched controls; evaluate each condition.

    Examples:
      cwa perturb latest --method sign_flip --controls random_k,bottom_k --seeds 0,1,2
      cwa perturb latest --method scale --scales 0,0.5,2 --k-values 10,100,1000
      cwa perturb latest --method bit_flip --eval perplexity,lambada --limit 200
    """
    if list_methods:
        from cwa.perturbation import PERTURBATION_METHODS, SELECTIONS

        rows = PERTURBATION_METHODS.describe() + [
            (f"{n} (selection)", d) for n, d in SELECTIONS.describe()
        ]
        print_choices(ctx, rows, "method")
        return
    from cwa.errors import UsageError
    from cwa.parsing import parse_float_list, parse_int_list, parse_name_list, parse_seeds
    from cwa.ranking_prefix import parse_k_values
    from cwa.stages.perturb import PerturbConfig, parse_heads, run_perturb, validate_config

    if scale is not None and scales is not None:
        raise UsageError("give --scale or --scales, not both")
    config = PerturbConfig(
        rank_run=rank_run,
        method=method,
        scales=[scale] if scale is not None else parse_float_list(scales, what="scale"),
        bit=bit,
        controls=parse_name_list(controls) or [],
        treatment=treatment,
        seeds=parse_seeds(seeds),
        k_values=parse_k_values(k_values),
        layers=parse_int_list(layers, what="layer"),
        components=parse_name_list(components),
        heads=parse_heads(heads),
        tasks=tasks,
        limit=limit,
        batch_size=batch_size,
        device=device,
        device_map=device_map,
        experiment=experiment,
        command=command_line(),
        items=not no_items,
        layer_reuse=not no_layer_reuse,
        layer_reuse_budget_gb=layer_reuse_budget,
    )
    validate_config(config)
    with reporter_for(ctx) as reporter:
        outcome = run_perturb(
            open_store(ctx, must_exist=True), config, reporter=reporter, mlflow=mlflow_flag(ctx)
        )
    print_outcomes(ctx, [outcome])
    if not state(ctx).json and not state(ctx).quiet:
        print_damage_table(outcome.value["summary"], title=f"perturb run {outcome.run_id}")


def print_damage_table(summary: dict, *, title: str, to_stdout: bool = False) -> None:
    """Mean metric per selection next to the baseline (token counts left out)."""
    rows = []
    for (selection, task, metric), s in sorted(
        summary.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])
    ):
        if metric == "tokens":
            continue
        rows.append(
            (task, metric, selection, s["baseline"], s["mean"], s["std"], int(s["n"]), s["ratio"])
        )
    console = _output.stdout if to_stdout else _output.stderr
    console.print(
        _output.table(
            ("task", "metric", "selection", "baseline", "mean", "std over seeds", "n", "ratio"),
            rows,
            title=title,
        )
    )
