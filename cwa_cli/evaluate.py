"""``cwa evaluate``: perplexity, HellaSwag and LAMBADA on a model (lm-eval definitions)."""

from __future__ import annotations

from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import command_line, mlflow_flag, open_store, print_choices, reporter_for
from cwa_cli._options import (
    BatchSizeOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ExperimentLabelOpt,
    ListOpt,
    SeedOpt,
    TextColumnOpt,
    TrustRemoteCodeOpt,
)
from cwa_cli._state import state


@error_boundary
def evaluate_cmd(
    ctx: typer.Context,
    run: Annotated[
        str | None,
        typer.Argument(
            help="Evaluate the model of this run instead of --model.", show_default=False
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model name, folder or 'toy'.")
    ] = None,
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks",
            "-t",
            help="Comma-separated TASK[:SOURCE]; SOURCE is toy, a local file, or hf.",
        ),
    ] = "perplexity,hellaswag,lambada",
    limit: Annotated[
        int | None,
        typer.Option("--limit", help="Evaluate a seeded random subset of N items per task."),
    ] = None,
    batch_size: BatchSizeOpt = 16,
    seed: SeedOpt = 0,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len", help="Perplexity window (default: the model's context, at most 1024)."
        ),
    ] = None,
    stride: Annotated[
        int | None, typer.Option("--stride", help="Sliding-window perplexity with this stride.")
    ] = None,
    text_column: TextColumnOpt = None,
    heldout_fraction: Annotated[
        float | None,
        typer.Option(
            "--heldout-fraction",
            help="Score only this last fraction of perplexity texts (automatic, with the "
            "calibration run's fraction, when the text is the calibration text of RUN).",
        ),
    ] = None,
    no_items: Annotated[
        bool,
        typer.Option("--no-items", help="Do not store per-item records (evaluation_items)."),
    ] = False,
    show_items: Annotated[
        bool, typer.Option("--items", help="With --json, also print the per-item records.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Recompute even if this model and task config were evaluated."
        ),
    ] = False,
    experiment: ExperimentLabelOpt = "default",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    list_tasks: ListOpt = False,
) -> None:
    """Evaluate a model; results go to the `evaluations` table.

    Examples:
      cwa evaluate --model toy
      cwa evaluate --model gpt2 --tasks hellaswag --limit 500
      cwa evaluate --model toy --tasks perplexity:notes.txt,lambada:toy
    """
    from cwa.errors import UsageError

    if list_tasks:
        from cwa.evaluation.tasks import TASKS

        print_choices(ctx, TASKS.describe(), "task")
        return
    from cwa.stages.common import ModelOptions
    from cwa.stages.evaluate import EvaluateConfig, run_evaluate

    if (run is None) == (model is None):
        raise UsageError("pass either --model MODEL or a RUN whose model to evaluate")
    config = EvaluateConfig(
        model=ModelOptions(model or "", dtype, device, trust_remote_code, device_map),
        from_run=run,
        tasks=tasks,
        limit=limit,
        batch_size=batch_size,
        seed=seed,
        seq_len=seq_len,
        stride=stride,
        text_column=text_column,
        heldout_fraction=heldout_fraction,
        items=not no_items,
        force=force,
        experiment=experiment,
        command=command_line(),
    )
    with reporter_for(ctx) as reporter:
        outcome = run_evaluate(open_store(ctx), config, reporter=reporter, mlflow=mlflow_flag(ctx))
    rows = outcome.value
    if state(ctx).json:
        payload = {"run_id": outcome.run_id, "results": rows}
        if show_items:
            from cwa.evaluation.records import evaluation_item_rows

            payload["items"] = evaluation_item_rows(open_store(ctx), outcome.run_id)
        _output.emit_json(payload)
        return
    _output.stdout.print(
        _output.table(
            ("task", "metric", "value", "stderr", "n", "reused from"),
            [
                (r["task"], r["metric"], r["value"], r["stderr"], r["n"], r["reused_from"])
                for r in rows
            ],
            title=f"evaluate run {outcome.run_id}",
        )
    )
    for note in dict.fromkeys(r["note"] for r in rows if r.get("note")):
        _output.stdout.print(f"note: {note}", markup=False)
