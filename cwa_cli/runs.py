"""``cwa runs``: list, show and delete runs."""

from __future__ import annotations

import json

import typer

from cwa_cli import _output, runs_manage, runs_recover
from cwa_cli._boundary import error_boundary, fail
from cwa_cli._common import existing_store
from cwa_cli._options import ExperimentOpt, LimitOpt, RunRef, StageOpt, StatusOpt
from cwa_cli._state import state

app = typer.Typer(help="List, inspect and delete runs in the store.", no_args_is_help=True)
app.command("compare")(runs_manage.compare_cmd)
app.command("tag")(runs_manage.tag_cmd)
app.command("export")(runs_manage.export_cmd)
app.command("recover")(runs_recover.recover_cmd)

_STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "interrupted": "yellow",
    "running": "cyan",
}


@app.command("list")
@error_boundary
def list_cmd(
    ctx: typer.Context,
    stage: StageOpt = None,
    experiment: ExperimentOpt = None,
    status: StatusOpt = None,
    limit: LimitOpt = 50,
) -> None:
    """List runs, newest first.

    Example: cwa runs list --stage score --status succeeded -n 10
    """
    from cwa.store import list_runs

    runs = list_runs(
        existing_store(ctx), stage=stage, experiment=experiment, status=status, limit=limit
    )
    if state(ctx).json:
        _output.emit_json([r.to_dict() for r in runs])
        return
    rows = []
    for r in runs:
        style = _STATUS_STYLE.get(r.status, "")
        rows.append(
            (
                r.run_id,
                r.stage,
                f"[{style}]{r.status}[/{style}]" if style else r.status,
                r.model_ref,
                r.seed,
                r.created_at.strftime("%m-%d %H:%M:%S") if r.created_at else None,
                None if r.duration_s is None else f"{r.duration_s:.1f}s",
                ",".join(p[:10] for p, _ in r.parents),
                r.experiment,
            )
        )
    columns = (
        "run_id",
        "stage",
        "status",
        "model",
        "seed",
        "created (UTC)",
        "duration",
        "parents",
        "experiment",
    )
    _output.stdout.print(_output.table(columns, rows))
    if not runs:
        _output.info("No runs match.", quiet=state(ctx).quiet)


@app.command("show")
@error_boundary
def show_cmd(ctx: typer.Context, run: RunRef) -> None:
    """Show one run: config, lineage, metrics, artifacts and result tables.

    Example: cwa runs show latest:score
    """
    from cwa.store import run_details

    details = run_details(existing_store(ctx), run)
    if state(ctx).json:
        _output.emit_json(details.to_dict())
        return
    r = details.run
    out = _output.stdout
    out.print(f"[bold]{r.run_id}[/bold]  {r.stage}  status={r.status}  experiment={r.experiment}")
    fields = [
        ("model", r.model_ref),
        ("fingerprint", r.model_fingerprint),
        ("seed", r.seed),
        ("created (UTC)", r.created_at),
        ("duration", r.duration_s),
        ("device", r.device),
        ("cwa", r.cwa_version),
        ("git", r.git_sha),
        ("mlflow run", r.mlflow_run_id),
        ("command", r.command),
        ("error", r.error),
    ]
    out.print(_output.table(("field", "value"), [(k, v) for k, v in fields if v is not None]))
    out.print("[bold]config[/bold]")
    out.print(json.dumps(r.config, indent=2, sort_keys=True, default=str), highlight=False)
    if r.parents or details.children or details.ancestors:
        lineage = [("parent", p, role) for p, role in r.parents]
        lineage += [("ancestor", a, f"depth {d}") for a, d in details.ancestors if d > 1]
        lineage += [("child", c, f"{s} ({st})") for c, s, st in details.children]
        out.print(_output.table(("relation", "run_id", "detail"), lineage, title="lineage"))
    if details.tags:
        out.print(_output.table(("tag", "value"), details.tags.items(), title="tags"))
    if details.metrics:
        out.print(_output.table(("metric", "value"), details.metrics.items(), title="metrics"))
    if details.result_counts:
        out.print(_output.table(("table", "rows"), details.result_counts.items(), title="results"))
    if details.artifacts:
        rows = [(a["name"], a["kind"], _output.human_bytes(a["bytes"])) for a in details.artifacts]
        out.print(_output.table(("artifact", "kind", "size"), rows, title="artifacts"))


@app.command("delete")
@error_boundary
def delete_cmd(
    ctx: typer.Context,
    run: RunRef,
    recursive: bool = typer.Option(
        False, "--recursive", "-r", help="Also delete every run derived from this one."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a run, its results, artifacts and MLflow copy (refuses when other runs depend on it).

    Example: cwa runs delete 01J9Z3 --recursive --yes
    """
    from cwa.store import run_details
    from cwa.store.runs import delete_runs

    store = existing_store(ctx)
    if not yes:
        details = run_details(store, run)
        rid = details.run.run_id
        if not _interactive():
            raise fail(f"deleting run {rid} needs confirmation; pass --yes")
        if not typer.confirm(f"Delete run {rid} ({details.run.stage})?", err=True):
            raise typer.Exit(1)
        run = rid
    removed = delete_runs(store, run, recursive=recursive)
    deleted = list(removed)
    # The MLflow copies go too (marked deleted there), whether or not the mirror is on now.
    from cwa.mlflow_sync import delete_mirrored
    from cwa_cli._common import reporter_for

    with reporter_for(ctx) as reporter:
        mlflow_deleted = delete_mirrored(store, removed, reporter)
    if state(ctx).json:
        _output.emit_json({"deleted": deleted, "mlflow_deleted": mlflow_deleted})
    else:
        also = f" (and {len(mlflow_deleted)} MLflow run(s))" if mlflow_deleted else ""
        _output.info(f"Deleted {len(deleted)} run(s){also}: {', '.join(deleted)}", quiet=False)


def _interactive() -> bool:
    import sys

    return sys.stdin.isatty()
