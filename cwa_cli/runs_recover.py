"""``cwa runs recover``: write the kept results of a run whose final write failed."""

from __future__ import annotations

from typing import Annotated

import typer

from cwa_cli._boundary import error_boundary
from cwa_cli._common import existing_store, mlflow_flag, print_outcomes, reporter_for


@error_boundary
def recover_cmd(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id or prefix of the failed run.")],
) -> None:
    """Write the computed results a failed run kept (its final write failed, e.g. the store was
    locked) and mark it succeeded. Prints the run id.

    Example: cwa runs recover 01J9Z3
    """
    from cwa.recovery import recover_run

    store = existing_store(ctx)
    with reporter_for(ctx) as reporter:
        outcome = recover_run(store, run, mlflow=mlflow_flag(ctx), reporter=reporter)
    print_outcomes(ctx, [outcome])
