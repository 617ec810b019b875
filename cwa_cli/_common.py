"""Small pieces shared by stage commands: store and reporter from the global options,
printing a finished run, parsing list options."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from cwa_cli import _output
from cwa_cli._progress import RichReporter
from cwa_cli._state import CliState, state


@contextmanager
def reporter_for(ctx: typer.Context) -> Iterator[RichReporter]:
    reporter = RichReporter(quiet=state(ctx).quiet)
    try:
        yield reporter
    finally:
        reporter.stop()


def open_store(ctx: typer.Context, *, must_exist: bool = False):
    """The store for a stage; ``must_exist`` for stages that need a parent run in it."""
    from cwa.errors import StoreNotFound
    from cwa.store import Store, default_store_path

    path = state(ctx).store or default_store_path()
    if must_exist and not (path / "cwa.duckdb").exists():
        raise StoreNotFound(
            f"no store at {path}; this stage needs runs from an earlier stage there (pass "
            "--store or set CWA_STORE)"
        )
    return Store.open(path)


def existing_store(ctx: typer.Context):
    """The store of ``--store`` / ``CWA_STORE`` for commands that read or manage runs; refuses
    (``StoreNotFound``) rather than create an empty store."""
    from cwa.store import Store

    return Store.open_existing(state(ctx).store)


def mlflow_flag(ctx: typer.Context) -> bool | None:
    return state(ctx).mlflow


def command_line() -> str:
    return " ".join(["cwa", *sys.argv[1:]])


def print_outcomes(ctx: typer.Context, outcomes, *, extra: dict | None = None) -> None:
    """Run ids to stdout (one per line), or a JSON document with --json."""
    st: CliState = state(ctx)
    if st.json:
        _output.emit_json(
            {
                "runs": [
                    {
                        "run_id": o.run_id,
                        "stage": o.stage,
                        "status": o.status,
                        "metrics": o.metrics,
                        "mlflow_run_id": o.mlflow_run_id,
                        "artifacts": str(o.artifacts_dir),
                    }
                    for o in outcomes
                ],
                **(extra or {}),
            }
        )
        return
    for o in outcomes:
        sys.stdout.write(o.run_id + "\n")
    sys.stdout.flush()


def print_choices(ctx: typer.Context, rows: list[tuple[str, str]], kind: str) -> None:
    if state(ctx).json:
        _output.emit_json([{"name": n, "description": d} for n, d in rows])
    else:
        _output.stdout.print(_output.table((kind, "description"), rows))
