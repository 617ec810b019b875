"""Render the self-contained ``report.html`` from the figures, findings and provenance.

The page carries its CSS inline and its figures as base64 PNG, so it opens offline, from disk
or as a mail attachment, and makes no network request.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cwa import __version__
from cwa.reporting.build import DrawnFigure
from cwa.reporting.runset import RunSet
from cwa.reporting.summary import Finding, provenance

TEMPLATE = "template.html.j2"


def render_html(
    *,
    runs: RunSet,
    figures: Sequence[DrawnFigure],
    findings: Sequence[Finding],
    store_label: str,
    report_run: str | None = None,
    title: str | None = None,
) -> str:
    """The report page as one HTML string (Jinja2, autoescaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
        keep_trailing_newline=True,
    )
    model = next((r.model_ref for r in runs.runs if r.model_ref), None)
    context: dict[str, Any] = {
        "title": title or f"cwa report{f' — {model}' if model else ''}",
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cwa_version": __version__,
        "store": store_label,
        "report_run": report_run,
        "experiment": runs.experiment,
        "findings": list(findings),
        "finding_sql": list(dict.fromkeys(f.sql for f in findings)),
        "figures": list(figures),
        "runs": provenance(runs),
    }
    return env.get_template(TEMPLATE).render(**context)
