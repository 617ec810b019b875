"""``cwa demo``: the whole chain on the offline toy model, with a damage summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import command_line, mlflow_flag, open_store, reporter_for
from cwa_cli._state import state
from cwa_cli.run import report, report_path


@error_boundary
def demo_cmd(
    ctx: typer.Context,
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds of the random controls.")] = "0,1,2",
    limit: Annotated[int, typer.Option("--limit", help="Items per task.")] = 200,
    out_dir: Annotated[
        str | None,
        typer.Option("--out-dir", help="Also export files (top_weights.csv, results, manifest)."),
    ] = None,
) -> None:
    """Score -> rank -> evaluate -> perturb -> analyze -> report on the toy model (offline).

    Builds the toy model on first use (cached in CWA_CACHE), scores it with grad_x_weight,
    ranks the global top 0.05% of weights, sign-flips them and the random_k / bottom_k controls
    over three seeds, and evaluates perplexity, toy HellaSwag and toy LAMBADA after each;
    then profiles the scores and writes the report (report.html with every figure).
    """
    from cwa.parsing import parse_seeds
    from cwa.stages.pipeline import demo_config, run_demo

    config = demo_config(
        seeds=parse_seeds(seeds), out_dir=out_dir, command=command_line(), limit=limit
    )
    store = open_store(ctx)
    with reporter_for(ctx) as reporter:
        result = run_demo(store, config, reporter=reporter, mlflow=mlflow_flag(ctx))
    report(ctx, result)
    if not state(ctx).json and not state(ctx).quiet:
        db = store.path.resolve()
        page = report_path(result)
        if page is not None:
            _output.stderr.print(
                f"\nReport: {page}\n  open it in a browser: xdg-open {page}  (macOS: open "
                f"{page}; or file://{Path(page).resolve()})",
                highlight=False,
            )
        _output.stderr.print(
            "\nNext:\n"
            f'  cwa sql "SELECT selection, task, metric, avg(value), avg(ratio) FROM '
            f"perturbation_effects WHERE run_id = '{result.perturb.run_id}' GROUP BY ALL "
            'ORDER BY ALL"\n'
            f"  cwa runs show {result.perturb.run_id}\n"
            f"  cwa --store {db} mlflow ui     # MLflow UI, opened on the runs table",
            highlight=False,
        )
