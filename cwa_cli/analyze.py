"""``cwa analyze``: run an analyzer (profile, stability, drift, ...) over stored runs."""

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
from cwa_cli._options import ListOpt
from cwa_cli._state import state


def _display_json(result) -> dict:
    return {
        "tables": [
            {
                "title": t.title,
                "rows": [dict(zip(t.columns, row, strict=True)) for row in t.rows],
            }
            for t in (result.display if result is not None else [])
        ]
    }


@error_boundary
def analyze_cmd(
    ctx: typer.Context,
    analyzer: Annotated[
        str | None,
        typer.Argument(
            help="Analyzer name (see --list), or module:attr of a plugin.", show_default=False
        ),
    ] = None,
    runs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Input runs: ids, unique prefixes, 'latest' or 'latest:STAGE'.",
            show_default=False,
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            "--experiment",
            "-e",
            help="Use every succeeded run of the analyzer's input stage in this experiment.",
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="Analyzer option key=value (repeatable)."),
    ] = None,
    k_values: Annotated[
        str | None,
        typer.Option("--k-values", help="k list, e.g. '100,1000,10000,0.1%' (option k_values)."),
    ] = None,
    k: Annotated[int | None, typer.Option("--k", help="k (option k).")] = None,
    p: Annotated[float | None, typer.Option("--p", help="RBO persistence (option p).")] = None,
    rank_run: Annotated[
        str | None, typer.Option("--rank-run", help="Rank run to use (option rank_run).")
    ] = None,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="super_weights: ablate each candidate (option verify)."),
    ] = False,
    plugin: Annotated[
        list[str] | None,
        typer.Option("--plugin", help="Register an analyzer plugin module:attr (repeatable)."),
    ] = None,
    show: Annotated[int, typer.Option("--show", help="Rows to print per table (0: none).")] = 15,
    list_analyzers: ListOpt = False,
) -> None:
    """Analyze stored runs; prints the analyze run id and the main result tables.

    Examples:
      cwa analyze --list
      cwa analyze profile latest:score
      cwa analyze stability --experiment seeds --k-values 100,1000,0.1%
      cwa analyze correlation RUN_A RUN_B
      cwa analyze drift BASE_RUN TUNED_RUN -o threshold=0.5
      cwa analyze super_weights latest:score --verify
    """
    from cwa.analysis import ANALYZERS
    from cwa.analysis import list_analyzers as available

    if list_analyzers or analyzer in (None, "list"):
        for spec in plugin or ():
            ANALYZERS.load_plugin(spec)
        if analyzer is None and not list_analyzers:
            from cwa.errors import UsageError

            raise UsageError("give an analyzer name (e.g. cwa analyze profile), or --list")
        print_choices(ctx, available(), "analyzer")
        return
    from cwa.analysis.base import parse_option_pairs
    from cwa.stages.analyze import AnalyzeConfig, run_analyze

    options: dict[str, object] = parse_option_pairs(option)
    for name, value in (("k_values", k_values), ("k", k), ("p", p), ("rank_run", rank_run)):
        if value is not None:
            options[name] = value
    if verify:
        options["verify"] = "true"
    config = AnalyzeConfig(
        analyzer=analyzer,
        runs=list(runs or []),
        input_experiment=experiment,
        options=options,
        plugins=list(plugin or []),
        command=command_line(),
    )
    with reporter_for(ctx) as reporter:
        outcome = run_analyze(
            open_store(ctx, must_exist=True), config, reporter=reporter, mlflow=mlflow_flag(ctx)
        )
    st = state(ctx)
    if st.json:
        print_outcomes(ctx, [outcome], extra=_display_json(outcome.value))
        return
    print_outcomes(ctx, [outcome])
    if show > 0 and not st.quiet and outcome.value is not None:
        for table in outcome.value.display:
            rows = table.rows[:show]
            _output.stderr.print(_output.table(table.columns, rows, title=table.title))
