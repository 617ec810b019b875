"""``cwa sql``: read-only SQL over the store."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._state import state


class SqlFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


@error_boundary
def sql_cmd(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="A SELECT query (the store is opened read-only).")],
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
    """
    from cwa.errors import InvalidInput
    from cwa.store import Store
    from cwa.store.query import query as run_query

    chosen = fmt or (SqlFormat.json if state(ctx).json else SqlFormat.table)
    if chosen is SqlFormat.parquet and output is None:
        raise InvalidInput("--format parquet needs --output FILE")
    if output is not None and not output.parent.resolve().is_dir():
        raise InvalidInput(f"--output {output}: folder {output.parent} does not exist; create it")
    frame = run_query(Store.open_existing(state(ctx).store), query)
    if chosen is SqlFormat.table:
        if output is not None:
            raise InvalidInput(
                "--format table prints to the terminal; use csv, json or parquet with --output"
            )
        rows = frame.rows()
        _output.stdout.print(_output.table(frame.columns, rows))
        _output.info(f"{len(rows)} row(s)", quiet=state(ctx).quiet)
        return
    if chosen is SqlFormat.parquet:
        frame.write_parquet(output)
    elif chosen is SqlFormat.csv:
        text = frame.write_csv()
        _write(text, output)
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
