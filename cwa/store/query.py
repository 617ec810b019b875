"""Read-only SQL over a store, for ``cwa sql`` and notebooks.

:func:`query` runs one SELECT/EXPLAIN/WITH statement on a read-only connection, with parameters
bound by DuckDB. :func:`run_sql` is what ``cwa sql`` calls: it takes the query inline, from stdin
or from a file (optionally one named query of it) and resolves ``--param`` values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa.errors import InvalidInput
from cwa.store.runs import resolve_run_id
from cwa.store.sqlfile import (
    NamedQuery,
    bind_parameters,
    parse_named_queries,
    read_sql_source,
    select_query,
)
from cwa.store.store import Store

if TYPE_CHECKING:
    import polars as pl

_QUERY_KINDS = {"SELECT", "EXPLAIN"}
_READ_ONLY_RE = re.compile(r"Cannot execute statement of type (\w+)")


def _refuse_writes(kinds: list[str]) -> None:
    refused = [k for k in kinds if k not in _QUERY_KINDS]
    if refused:
        # The connection is read-only for the database, but COPY ... TO, EXPORT or ATTACH
        # could still write files elsewhere: only queries are accepted.
        raise InvalidInput(
            f"cwa sql is read-only and refused a {refused[0]} statement; it runs SELECT "
            "queries only (results change only through stages and `cwa runs delete`)"
        )


def query(store: Store, sql: str, params: dict[str, Any] | None = None) -> pl.DataFrame:
    """Run ``sql`` on a read-only connection and return the result as a polars DataFrame."""
    import duckdb

    if not sql.strip():
        raise InvalidInput('empty SQL; pass a query such as "SELECT * FROM runs"')
    with store.read() as con:
        try:
            statements = con.extract_statements(sql)
            if not statements:
                raise InvalidInput(
                    "the SQL holds no statement (only comments?); pass a query such as "
                    '"SELECT * FROM runs"'
                )
            _refuse_writes([st.type.name for st in statements])
            if len(statements) > 1:
                raise InvalidInput(
                    f"the SQL holds {len(statements)} statements; cwa sql runs one query (put "
                    "several under '-- name: ...' headers in a file and pick one with --name)"
                )
            relation = con.sql(sql, params=params or None)
            if relation is None:
                raise InvalidInput("the statement returned no rows to show; pass a SELECT query")
            return relation.pl()
        except duckdb.Error as exc:
            text = str(exc).strip().splitlines()[0]
            match = _READ_ONLY_RE.search(text)
            if match or "read-only" in text:
                kind = match.group(1) if match else "write"
                raise InvalidInput(
                    f"cwa sql is read-only and refused a {kind} statement; results change only "
                    "through stages and `cwa runs delete`"
                ) from exc
            raise InvalidInput(f"SQL error: {text}") from exc


@dataclass
class SqlRequest:
    """What ``cwa sql`` was asked: inline/stdin text or a file, a query name, parameters."""

    text: str | None = None  # inline query or stdin contents
    file: Path | None = None
    name: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    def source(self) -> tuple[str, str]:
        """(text, label for messages)."""
        if self.file is not None:
            if self.text is not None:
                raise InvalidInput("pass either a query or --file, not both")
            return read_sql_source(self.file), str(self.file)
        if self.text is None:
            raise InvalidInput('no query; pass one ("SELECT ..."), "-" for stdin, or --file FILE')
        return self.text, "the query"


def list_queries(request: SqlRequest) -> list[NamedQuery]:
    """The named queries of the request's file or text (``--list``); needs no store."""
    text, label = request.source()
    queries = parse_named_queries(text, label)
    if not queries:
        raise InvalidInput(f"{label} has no '-- name: ...' headers; it is one query")
    return queries


def run_sql(store_path: str | Path | None, request: SqlRequest) -> pl.DataFrame:
    """Pick the query, bind its parameters (run references resolved) and run it read-only."""
    text, label = request.source()
    chosen = select_query(text, request.name, label)
    store = Store.open_existing(store_path)

    def resolve(ref: str) -> str:
        with store.read() as con:
            return resolve_run_id(con, ref, store_label=store.label)

    params = bind_parameters(chosen.sql, request.params, chosen.defaults, resolve)
    return query(store, chosen.sql, params)
