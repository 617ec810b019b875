"""``cwa runs compare``, ``cwa runs tag`` and ``cwa runs export`` (registered in ``runs.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import existing_store, reporter_for
from cwa_cli._state import state


def _cell(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return _output.format_cell(value)


@error_boundary
def compare_cmd(
    ctx: typer.Context,
    runs: Annotated[
        list[str], typer.Argument(help="Two or more run ids, prefixes or latest[:STAGE].")
    ],
    all_rows: Annotated[
        bool, typer.Option("--all", help="Also show rows where every run agrees.")
    ] = False,
) -> None:
    """Config and metrics of runs side by side; differing rows are marked with '*'.

    Example: cwa runs compare 01J9Z3 01J9Z4 01J9Z5
    """
    from cwa.store.compare import compare_runs

    comparison = compare_runs(existing_store(ctx), runs)
    if state(ctx).json:
        _output.emit_json(comparison.to_dict())
        return
    shown = [r for r in comparison.rows if all_rows or r.differs or r.section == "run"]
    columns = ("", "section", "key", *(rid[-10:] for rid in comparison.run_ids))
    rows = [
        ("*" if r.differs else "", r.section, r.key, *(_cell(v) for v in r.values)) for r in shown
    ]
    _output.stdout.print(_output.table(columns, rows))
    n_diff = sum(r.differs for r in comparison.rows)
    hidden = "" if all_rows else " (rows that agree are hidden except provenance; --all shows them)"
    _output.info(f"{n_diff} of {len(comparison.rows)} rows differ{hidden}", quiet=state(ctx).quiet)


@error_boundary
def tag_cmd(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id, a unique prefix, or latest[:STAGE].")],
    tags: Annotated[
        list[str] | None, typer.Argument(help="KEY=VALUE tags (KEY= removes one).")
    ] = None,
    note: Annotated[
        str | None, typer.Option("--note", help="A free-text note (shown by runs show).")
    ] = None,
) -> None:
    """Tag a run and/or attach a note; stored in the store and mirrored to MLflow.

    Examples:
      cwa runs tag latest:perturb paper=fig3 verdict=keep
      cwa runs tag 01J9Z3 --note "bottom_k damage suspicious; rerun with more items"
    """
    from cwa.mlflow_sync import push_tags
    from cwa.store.tags import NOTE_KEY, parse_tag_items, set_run_tags

    items = parse_tag_items(tags or [])
    if note is not None:
        items[NOTE_KEY] = note
    run_id, current = set_run_tags(existing_store(ctx), run, items)
    removed = [k for k, v in items.items() if v == ""]
    mirrored = False
    if state(ctx).mlflow is not False:
        with reporter_for(ctx) as reporter:
            mirrored = push_tags(existing_store(ctx), run_id, removed, reporter)
    if state(ctx).json:
        _output.emit_json({"run_id": run_id, "tags": current, "mlflow": mirrored})
        return
    _output.stdout.print(_output.table(("tag", "value"), current.items(), title=run_id))


@error_boundary
def export_cmd(
    ctx: typer.Context,
    runs: Annotated[list[str], typer.Argument(help="Run ids, prefixes or latest[:STAGE].")],
    to: Annotated[Path, typer.Option("--to", help="New (or empty) folder to write.")],
    with_ancestors: Annotated[
        bool, typer.Option("--with-ancestors", help="Also export every ancestor of the runs.")
    ] = False,
) -> None:
    """Export runs (rows of every table, artifacts, provenance.json) for `cwa db import`.

    Example: cwa runs export latest:perturb --with-ancestors --to results/perturb-export
    """
    from cwa.store.transfer import export_runs

    result = export_runs(existing_store(ctx), runs, to, with_ancestors=with_ancestors)
    if state(ctx).json:
        _output.emit_json(
            {
                "folder": str(result.folder),
                "runs": result.run_ids,
                "rows": result.rows,
                "artifact_bytes": result.artifact_bytes,
            }
        )
        return
    _output.stdout.print(_output.table(("table", "rows"), result.rows.items(), title=str(to)))
    _output.info(
        f"Exported {len(result.run_ids)} run(s) and "
        f"{_output.human_bytes(result.artifact_bytes)} of artifacts to {to}; load them "
        f"elsewhere with: cwa --store OTHER db import {to}",
        quiet=state(ctx).quiet,
    )
