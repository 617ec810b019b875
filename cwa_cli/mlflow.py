"""``cwa mlflow``: re-mirror runs to MLflow, and open the MLflow UI on the runs table."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import existing_store, reporter_for
from cwa_cli._state import state

app = typer.Typer(help="Mirror runs to MLflow and open the MLflow UI.", no_args_is_help=True)


@app.command("sync")
@error_boundary
def sync_cmd(
    ctx: typer.Context,
    runs: Annotated[
        list[str] | None,
        typer.Argument(help="Run ids, prefixes or latest[:STAGE] (default: every finished run)."),
    ] = None,
    copy_scores: Annotated[
        bool,
        typer.Option(
            "--copy-scores",
            help="Also copy score files into MLflow (default: path + sha256 only; or "
            "CWA_MLFLOW_COPY_SCORES=1).",
        ),
    ] = False,
) -> None:
    """(Re-)mirror runs to MLflow, replacing their earlier MLflow copies.

    Examples:
      cwa mlflow sync                  # every finished run, e.g. after running with --no-mlflow
      cwa mlflow sync latest:perturb --copy-scores
    """
    from cwa.mlflow_sync import sync_runs

    with reporter_for(ctx) as reporter:
        done = sync_runs(
            existing_store(ctx), runs or [], copy_scores=copy_scores or None, reporter=reporter
        )
    if state(ctx).json:
        _output.emit_json([{"run_id": r, "mlflow_run_id": m} for r, m in done])
        return
    for run_id, mlflow_run_id in done:
        sys.stdout.write(f"{run_id}\t{mlflow_run_id}\n")
    _output.info(f"Mirrored {len(done)} run(s).", quiet=state(ctx).quiet)


@app.command("ui")
@error_boundary
def ui_cmd(
    ctx: typer.Context,
    experiment: Annotated[
        str | None, typer.Option("--experiment", "-e", help="Experiment (default: newest run's).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 5000,
    print_only: Annotated[
        bool, typer.Option("--print-url", help="Only print the runs page address.")
    ] = False,
) -> None:
    """Start `mlflow ui` on this store's mirror and print the address of the runs table.

    Example: cwa mlflow ui --port 5001
    """
    from cwa.mlflow_mirror import tracking_uri
    from cwa.mlflow_sync import experiment_url
    from cwa.store import list_runs

    store = existing_store(ctx)
    if experiment is None:
        newest = list_runs(store, limit=1)
        experiment = newest[0].experiment if newest else "default"
    url = experiment_url(store, experiment, f"http://{host}:{port}")
    if print_only:
        sys.stdout.write(url + "\n")
        return
    _output.info(f"Runs of experiment {experiment!r}: {url}", quiet=False)
    args = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(store)]
    args += ["--host", host, "--port", str(port)]
    sys.stdout.flush()
    os.execv(sys.executable, args)
