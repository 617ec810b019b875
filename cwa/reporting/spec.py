"""The shape of a report figure: its data sources (SQL) and the function that draws it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Placeholders: {score_run} {rank_run} single quoted ids; {score_runs} {perturb_runs}
# {analyze_runs} comma-separated quoted ids. A source needing an absent one is skipped.


@dataclass(frozen=True)
class Source:
    sql: str
    tables: tuple[str, ...]
    needs: tuple[str, ...]
    min_rows: int = 1
    min_distinct: tuple[str, int] | None = None  # (column, how many distinct values)


@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    caption: str
    draw: str  # "module:function" in cwa.reporting, imported only when drawn
    sources: tuple[Source, ...]
    hint: str  # how to produce the data when it is absent
    options: Callable[[Any], dict[str, Any]] = field(default=lambda runs: {})
