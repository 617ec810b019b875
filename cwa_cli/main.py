"""The ``cwa`` command: global options and the list of subcommands.

Each subcommand lives in its own module and calls one library function; heavy libraries are
imported inside commands so that ``cwa --help``, ``cwa runs`` and ``cwa sql`` start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwa import __version__
from cwa_cli import analyze, db, demo, evaluate, model, perturb, rank, run, runs, score, sql, toy
from cwa_cli import mlflow as mlflow_cli
from cwa_cli._state import CliState
from cwa_cli._trailing import accept_trailing_output_flags
from cwa_cli.report import report_cmd

app = typer.Typer(
    name="cwa",
    help="Critical Weight Analysis: find the weights of a language model that matter most, "
    "prove it against matched controls, and query the evidence.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cwa {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    store: Annotated[
        Path | None,
        typer.Option("--store", envvar="CWA_STORE", help="Store directory (default: ./cwa_store)."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Machine-readable JSON on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or chatter.")] = False,
    no_mlflow: Annotated[
        bool, typer.Option("--no-mlflow", help="Do not mirror runs to MLflow (or CWA_MLFLOW=0).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    ctx.obj = CliState(
        store=store, json=json_output, quiet=quiet, mlflow=False if no_mlflow else None
    )


app.add_typer(runs.app, name="runs")
app.add_typer(db.app, name="db")
app.add_typer(model.app, name="model")
app.add_typer(toy.app, name="toy")
app.add_typer(mlflow_cli.app, name="mlflow")
app.command("sql", context_settings=sql.SQL_CONTEXT)(sql.sql_cmd)
app.command("score")(score.score_cmd)
app.command("rank")(rank.rank_cmd)
app.command("perturb")(perturb.perturb_cmd)
app.command("evaluate")(evaluate.evaluate_cmd)
app.command("run")(run.run_cmd)
app.command("demo")(demo.demo_cmd)
app.command("analyze")(analyze.analyze_cmd)
app.command("report")(report_cmd)

accept_trailing_output_flags(app)  # `cwa model inspect toy --json` as well as `cwa --json ...`


def main() -> None:
    import os

    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        # torchrun: ranks other than 0 compute but only rank 0 answers on stdout (run ids,
        # tables), so `RUN=$(torchrun ... -m cwa_cli score ...)` reads one answer.
        import sys

        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    app()


def entry() -> None:
    """The ``cwa`` command and ``python -m cwa_cli``: :func:`main`, then a fast exit."""
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    _fast_exit(code)


def _fast_exit(code: object) -> None:
    """Exit without the interpreter's teardown once a command has imported torch.

    Garbage-collecting torch's and transformers' modules at exit takes 1-2 s of a command's
    wall time and nothing depends on it: the atexit handlers still run (temporary folders,
    logging), the output streams are flushed, and every store connection and file was closed
    by its ``with`` block. Light commands, and ranks of a torchrun world, exit normally.
    """
    import os
    import sys

    if "torch" not in sys.modules or os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        raise SystemExit(code)
    import atexit

    atexit._run_exitfuncs()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message") prints the message and exits 1, as Python itself does
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
