"""``cwa report``: figures and a self-contained HTML report of stored runs."""

from __future__ import annotations

from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import command_line, mlflow_flag, open_store, reporter_for
from cwa_cli._state import state


@error_boundary
def report_cmd(
    ctx: typer.Context,
    runs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Runs to show (ids, prefixes, 'latest', 'latest:STAGE'); their ancestors and "
            "analyses of them are added. Default: the newest perturb run.",
            show_default=False,
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option("--experiment", "-e", help="Cover every succeeded run of this experiment."),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="Also write report.html and plots/ to this directory."),
    ] = None,
    formats: Annotated[
        str, typer.Option("--formats", help="Figure files to write: png, pdf and/or svg.")
    ] = "png,pdf,svg",
    title: Annotated[str | None, typer.Option("--title", help="Title of the page.")] = None,
) -> None:
    """Draw the figures and write one self-contained report.html from the store.

    Reads only stored results (never recomputes). Given a perturb run, follows its lineage to
    the rank, score and baseline runs and adds analyze runs of those inputs; given an
    experiment, covers all of its runs (e.g. every seed). A figure whose data is absent is
    listed as "not available" with the command that produces it.

    Examples:
      cwa report                          # the newest perturb run and its lineage
      cwa report latest:perturb --out results/report --formats png,svg
      cwa report --experiment seeds-study
    """
    from cwa.stages.report import ReportConfig, parse_formats, report_summary, run_report

    config = ReportConfig(
        runs=list(runs or []),
        experiment=experiment,
        out=out,
        formats=parse_formats(formats),
        title=title,
        command=command_line(),
    )
    store = open_store(ctx, must_exist=True)
    with reporter_for(ctx) as reporter:
        outcome = run_report(store, config, reporter=reporter, mlflow=mlflow_flag(ctx))
    summary = report_summary(outcome)
    st = state(ctx)
    if st.json:
        _output.emit_json(summary)
        return
    print(summary["out_report"] or summary["report"])
    if st.quiet:
        return
    lines = [f"report run {outcome.run_id}: {len(summary['figures'])} figure(s)"]
    lines += [f"  {finding}" for finding in summary["findings"]]
    if summary["missing"]:
        lines.append("not available: " + ", ".join(summary["missing"]))
    path = summary["out_report"] or summary["report"]
    lines.append(f"open it: xdg-open {path}  (or file://{_abspath(path)} in a browser)")
    _output.stderr.print("\n".join(lines), highlight=False, markup=False)


def _abspath(path: str) -> str:
    from pathlib import Path

    return str(Path(path).resolve())
