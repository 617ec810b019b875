"""Shared ``Annotated`` option aliases, so every command spells common options the same way."""

from __future__ import annotations

from typing import Annotated

import typer

RunRef = Annotated[
    str,
    typer.Argument(
        help="Run id, a unique prefix of one, 'latest' or 'latest:STAGE'.", show_default=False
    ),
]
StageOpt = Annotated[str | None, typer.Option("--stage", help="Only runs of this stage.")]
ExperimentOpt = Annotated[
    str | None, typer.Option("--experiment", "-e", help="Experiment/group label.")
]
StatusOpt = Annotated[
    str | None,
    typer.Option("--status", help="running, succeeded, failed or interrupted."),
]
LimitOpt = Annotated[int, typer.Option("--limit", "-n", help="Show at most this many rows.")]
