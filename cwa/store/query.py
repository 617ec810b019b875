"""Read-only SQL over a store, for ``cwa sql`` and notebooks."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from cwa.errors import InvalidInput
from cwa.store.store import Store

if TYPE_CHECKING:
    import polars as pl

_QUERY_KINDS = {"SELECT", "EXPLAIN"}
_READ_ONLY_RE = re.compile(r"Cannot execute statement of type (\w+)")


def query(store: Store, sql: str) -> pl.DataFrame:
    """Run ``sql`` on a read-only connection and return the result as a polars DataFrame."""
    import duckdb

    if not sql.strip():
        raise InvalidInput('empty SQL; pass a query such as "SELECT * FROM runs"')
    with store.read() as con:
        try:
            # The connection is read-only for the database, but COPY ... TO, EXPORT or ATTACH
            # could still write files elsewhere: only queries are accepted.
            kinds = [st.type.name for st in con.extract_statements(sql)]
            refused = [k for k in kinds if k not in _QUERY_KINDS]
            if refused:
                raise InvalidInput(
                    f"cwa sql is read-only and refused a {refused[0]} statement; it runs SELECT "
                    "queries only (results change only through stages and `cwa runs delete`)"
                )
            relation = con.sql(sql)
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
