"""Gather each figure's data from the store with its SQL, then draw and save the figures.

Data gathering and drawing are separate so that the report stage can query while holding only a
read connection and draw afterwards with no connection at all.
"""

from __future__ import annotations

import base64
import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa.reporting.catalog import FIGURES, FigureSpec, Source
from cwa.reporting.runset import RunSet
from cwa.store.store import Store

if TYPE_CHECKING:
    import polars as pl


@dataclass
class FigureData:
    spec: FigureSpec
    sql: str | None = None
    frame: pl.DataFrame | None = None
    missing: str | None = None  # why the figure is not drawn, with the command that fixes it
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DrawnFigure:
    data: FigureData
    png_base64: str | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.png_base64 is not None


def store_tables(con: Any) -> set[str]:
    rows = con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    return {r[0] for r in rows}


def _try_source(
    con: Any, source: Source, values: dict[str, str | None], tables: set[str]
) -> tuple[str | None, pl.DataFrame | None, str | None]:
    absent = [t for t in source.tables if t not in tables]
    if absent:
        return None, None, f"this store has no {', '.join(absent)} table"
    lacking = [n for n in source.needs if values.get(n) is None]
    if lacking:
        return None, None, "the report has no " + ", ".join(n.replace("_", " ") for n in lacking)
    sql = source.sql.format(**{k: v or "NULL" for k, v in values.items()})
    frame = con.sql(sql).pl()
    if frame.height < source.min_rows:
        return sql, None, f"the query returned {frame.height} row(s)"
    if source.min_distinct is not None:
        column, wanted = source.min_distinct
        distinct = frame[column].n_unique()
        if distinct < wanted:
            return sql, None, f"only {distinct} distinct {column} value(s); a curve needs {wanted}"
    return sql, frame, None


def collect(
    store: Store, runs: RunSet, specs: Sequence[FigureSpec] = FIGURES
) -> list[FigureData]:
    """Run every figure's query (first usable source wins) on one read connection."""
    values = runs.placeholders()
    collected: list[FigureData] = []
    with store.read() as con:
        tables = store_tables(con)
        for spec in specs:
            reasons = []
            item = FigureData(spec=spec, options=spec.options(runs))
            for source in spec.sources:
                sql, frame, reason = _try_source(con, source, values, tables)
                if frame is not None:
                    item.sql, item.frame = sql, frame
                    break
                reasons.append(reason)
            if item.frame is None:
                # The last source is the most basic one: its reason is the one to act on.
                item.missing = f"not available: {spec.hint} ({reasons[-1]})"
            collected.append(item)
    return collected


def draw_function(spec: FigureSpec) -> Any:
    module, _, name = spec.draw.partition(":")
    return getattr(importlib.import_module(f"cwa.reporting.{module}"), name)


def draw_all(
    collected: Iterable[FigureData], out_dir: Path | None, formats: Sequence[str]
) -> list[DrawnFigure]:
    """Draw each available figure, embed it as a PNG, and save it in ``formats`` to out_dir."""
    from cwa.reporting.style import close, render_formats, write_rendered

    drawn: list[DrawnFigure] = []
    for item in collected:
        result = DrawnFigure(data=item)
        if item.frame is not None:
            fig = draw_function(item.spec)(item.frame, **item.options)
            try:
                # Every format from this one drawing; the PNG (always made) is also embedded.
                wanted = formats if out_dir is not None else ()
                rendered = render_formats(fig, wanted)
                result.png_base64 = base64.b64encode(rendered["png"]).decode("ascii")
                if out_dir is not None and formats:
                    result.files = write_rendered(rendered, out_dir / item.spec.name, formats)
            finally:
                close(fig)
        drawn.append(result)
    return drawn
