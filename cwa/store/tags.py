"""User tags and notes on runs (table ``run_tags``, migration 0009).

A tag is a KEY=VALUE pair a researcher attaches to a run after the fact ("good=yes",
"paper=fig3"); the note is the tag ``note``. Keys are short identifiers; the ``mlflow.`` and
``cwa.`` prefixes are reserved for the mirror's own tags. An empty value removes the tag.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from cwa.errors import InvalidInput
from cwa.store.runs import resolve_run_id
from cwa.store.store import Store

NOTE_KEY = "note"
_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
_RESERVED = ("mlflow.", "cwa.")


def parse_tag_items(items: list[str]) -> dict[str, str]:
    """``["paper=fig3", "good="]`` -> {"paper": "fig3", "good": ""} (empty removes)."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise InvalidInput(f"tag {item!r} must be KEY=VALUE (KEY= removes the tag)")
        if not _KEY_RE.match(key):
            raise InvalidInput(
                f"tag key {key!r} must start with a letter and use letters, digits, _ . - "
                "(at most 64 characters)"
            )
        if key.lower().startswith(_RESERVED):
            raise InvalidInput(f"tag key {key!r} uses a reserved prefix (mlflow., cwa.)")
        if len(value) > 5000:
            raise InvalidInput(f"tag {key!r} is longer than 5000 characters")
        tags[key] = value
    return tags


def set_run_tags(store: Store, ref: str, tags: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Set (or, for empty values, remove) tags of a run; returns (run id, all its tags)."""
    if not tags:
        raise InvalidInput("nothing to tag; pass KEY=VALUE items and/or --note TEXT")
    now = datetime.now(UTC).replace(tzinfo=None)
    store.migrate()  # a store made before run tags existed gets the table first
    with store.write() as con:
        run_id = resolve_run_id(con, ref, store_label=store.label)
        for key, value in tags.items():
            con.execute("DELETE FROM run_tags WHERE run_id = ? AND key = ?", [run_id, key])
            if value != "":
                con.execute("INSERT INTO run_tags VALUES (?, ?, ?, ?)", [run_id, key, value, now])
    return run_id, read_run_tags(store, run_id)


def read_run_tags(store: Store, run_id: str) -> dict[str, str]:
    with store.read() as con:
        return tags_of(con, run_id)


def tags_of(con, run_id: str) -> dict[str, str]:  # noqa: ANN001 (a duckdb connection)
    """Tags of one run on an open connection (empty when the table does not exist yet)."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'run_tags'"
    ).fetchone()[0]
    if not exists:
        return {}
    rows = con.execute(
        "SELECT key, value FROM run_tags WHERE run_id = ? ORDER BY key", [run_id]
    ).fetchall()
    return dict(rows)
