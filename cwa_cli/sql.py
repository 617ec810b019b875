"""``cwa sql``: read-only SQL over the store, inline, from stdin or from a file of named queries."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._state import state

# A query that starts with a SQL comment ("-- ...") looks like an option to the parser; let
# unknown "options" through to the QUERY argument instead of failing with "No such option".
SQL_CONTEXT = {"ignore_unknown_options": True}


class SqlFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


@error_boundary
def sql_cmd(
    ctx: typer.Context,
    query: Annotated[
        str | None,
        typer.Argument(
            help="A SELECT query, or '-' to read it from stdin (the store is opened read-only)."
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Read the SQL from this file (optionally of named queries)."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Run the query with this '-- name:' header.")
    ] = None,
    list_names: Annotated[
        bool, typer.Option("--list", help="List the file's named queries and exit.")
    ] = False,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="KEY=VALUE bound to $KEY (run references such as latest:perturb are resolved).",
        ),
    ] = None,
    fmt: Annotated[
        SqlFormat | None,
        typer.Option("--format", "-f", help="Output format (default: table, or json with --json)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Query the experiment store with SQL (read-only).

    Examples:
      cwa sql "SELECT stage, status, count(*) FROM runs GROUP BY ALL"
      cwa sql "SELECT * FROM run_lineage" --format csv -o lineage.csv
      cwa sql --file examples/queries.sql --list
      cwa sql --file examples/queries.sql --name damage_for_run --param run=latest:perturb
      echo "SELECT count(*) FROM runs" | cwa sql -
    """
    from cwa.errors import InvalidInput
    from cwa.store.query import SqlRequest, list_queries, run_sql
    from cwa.store.sqlfile import parse_param_options

    text = sys.stdin.read() if query == "-" else query
    request = SqlRequest(text=text, file=file, name=name, params=parse_param_options(param or []))
    if list_names:
        queries = list_queries(request)
        if state(ctx).json:
            _output.emit_json(
                [
                    {"name": q.name, "description": q.description, "params": q.defaults}
                    for q in queries
                ]
            )
        else:
            _output.stdout.print(
                _output.table(("name", "description"), [(q.name, q.description) for q in queries])
            )
        return
    chosen = fmt or (SqlFormat.json if state(ctx).json else SqlFormat.table)
    if chosen is SqlFormat.parquet and output is None:
        raise InvalidInput("--format parquet needs --output FILE")
    if output is not None and not output.parent.resolve().is_dir():
        raise InvalidInput(f"--output {output}: folder {output.parent} does not exist; create it")
    if chosen is SqlFormat.table and output is not None:
        raise InvalidInput(
            "--format table prints to the terminal; use csv, json or parquet with --output"
        )
    frame = run_sql(state(ctx).store, request)
    if chosen is SqlFormat.table:
        rows = frame.rows()
        _output.stdout.print(_output.table(frame.columns, rows))
        _output.info(f"{len(rows)} row(s)", quiet=state(ctx).quiet)
        return
    if chosen is SqlFormat.parquet:
        frame.write_parquet(output)
    elif chosen is SqlFormat.csv:
        _write(frame.write_csv(), output)
    else:
        _write(_output.to_json(frame.to_dicts()) + "\n", output)
    if output is not None:
        _output.info(f"Wrote {frame.height} row(s) to {output}", quiet=state(ctx).quiet)


def _write(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        output.write_text(text, encoding="utf-8")
