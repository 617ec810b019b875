"""Test access to a store from outside a stage: reading what a stage wrote, and a script that
holds the store's write lock from another process (for the lock-conflict tests)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from cwa.store import Store


def store_rows(store: Store | Path | str, sql: str, params: list | None = None) -> list[tuple]:
    """Every row of ``sql`` on a read-only connection to ``store`` (a Store or its folder)."""
    target = store if isinstance(store, Store) else Store(store)
    with target.read() as con:
        return con.execute(sql, params or []).fetchall()


# Run as `python hold.py DB_PATH SECONDS`: opens a write transaction, prints "locked", keeps the
# lock SECONDS, then commits.
HOLD_LOCK_SCRIPT = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1])
    con.execute("BEGIN")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.execute("COMMIT")
    con.close()
    """
)
