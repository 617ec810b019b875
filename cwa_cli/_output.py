"""Output conventions: data on stdout (Rich tables or JSON), chatter on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# When piped (not a terminal) Rich would assume 80 columns; use a wide page instead so that
# tables stay one line per row in logs and files.
# emoji=False: data such as hub specs (hf:wikitext:wikitext-2-raw-v1:train:text) contain
# ":name:" sequences that Rich would otherwise turn into emoji.
stdout = Console(soft_wrap=True, emoji=False, width=None if sys.stdout.isatty() else 200)
stderr = Console(
    stderr=True, soft_wrap=True, emoji=False, width=None if sys.stderr.isatty() else 200
)


def _default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=_default, allow_nan=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(to_json(data) + "\n")
    sys.stdout.flush()


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None
) -> Table:
    out = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        if column == "run_id" or column.endswith("_run_id"):
            # ids must stay copy-pasteable: never wrap them
            out.add_column(column, no_wrap=True, min_width=26)
        else:
            out.add_column(column, overflow="fold")
    for row in rows:
        out.add_row(*(format_cell(v) for v in row))
    return out


def info(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        stderr.print(message, highlight=False)


def warn(message: str) -> None:
    stderr.print(f"[yellow]Warning:[/yellow] {message}", highlight=False)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
