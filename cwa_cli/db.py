"""``cwa db``: store status, migrations, importing exported runs, artifact garbage collection."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import existing_store
from cwa_cli._state import state

app = typer.Typer(help="Inspect and migrate the experiment store.", no_args_is_help=True)


@app.command("status")
@error_boundary
def status_cmd(ctx: typer.Context) -> None:
    """Store path, schema version, applied and pending migrations, sizes (never writes)."""
    from cwa.errors import StoreNotFound
    from cwa.store import Store

    store = Store(state(ctx).store)
    if not store.path.exists():
        raise StoreNotFound(f"no store at {store.path}; pass --store or set CWA_STORE")
    info = store.info()
    if state(ctx).json:
        _output.emit_json(
            {
                "path": str(info.path.resolve()),
                "database": str(info.db_path.resolve()),
                "exists": info.exists,
                "schema_version": info.schema_version,
                "applied": [a.name for a in info.applied],
                "pending": info.pending,
                "runs": info.n_runs,
                "bytes": {
                    "database": info.db_bytes,
                    "artifacts": info.artifacts_bytes,
                    "mlflow": info.mlflow_bytes,
                },
            }
        )
        return
    rows = [
        ("store", str(info.path.resolve())),
        ("database", str(info.db_path) if info.exists else f"{info.db_path} (not created yet)"),
        ("schema version", f"{info.schema_version:04d}"),
        ("applied", ", ".join(a.name for a in info.applied) or "none"),
        ("pending", ", ".join(info.pending) or "none"),
        ("runs", info.n_runs),
        ("database size", _output.human_bytes(info.db_bytes)),
        ("artifacts size", _output.human_bytes(info.artifacts_bytes)),
        ("mlflow db size", _output.human_bytes(info.mlflow_bytes)),
    ]
    _output.stdout.print(_output.table(("", ""), rows))


@app.command("migrate")
@error_boundary
def migrate_cmd(ctx: typer.Context) -> None:
    """Create the store if needed and apply pending migrations."""
    from cwa.store import Store

    store = Store(state(ctx).store)
    store._ensure_dir()
    applied = store.migrate()
    names = [m.name for m in applied]
    if state(ctx).json:
        _output.emit_json({"applied": names, "path": str(store.path.resolve())})
    elif names:
        _output.info(f"Applied {len(names)} migration(s): {', '.join(names)}")
    else:
        _output.info("Store is up to date.")


@app.command("import")
@error_boundary
def import_cmd(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="A folder written by `cwa runs export`.")],
) -> None:
    """Load exported runs into this store (created if needed); runs already here are skipped.

    Example: cwa --store laptop_store db import results/perturb-export
    """
    from cwa.store.transfer import import_runs

    result = import_runs(state(ctx).store, folder)
    if state(ctx).json:
        _output.emit_json(
            {
                "imported": result.imported,
                "skipped": result.skipped,
                "rows": result.rows,
                "missing_parents": result.missing_parents,
            }
        )
        return
    if result.rows:
        _output.stdout.print(_output.table(("table", "rows"), result.rows.items()))
    _output.info(f"Imported {len(result.imported)} run(s).")
    if result.skipped:
        _output.warn(
            f"skipped {len(result.skipped)} run(s) already in this store: "
            f"{', '.join(result.skipped)}"
        )
    if result.missing_parents:
        _output.warn(
            "parent run(s) not in this store (export with --with-ancestors to bring them): "
            + ", ".join(result.missing_parents)
        )
    if result.imported:
        _output.info("Mirror them to MLflow with: cwa mlflow sync " + " ".join(result.imported[:3]))


@app.command("gc")
@error_boundary
def gc_cmd(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only report what would be removed.")
    ] = False,
) -> None:
    """Remove artifact folders that belong to no run (e.g. of killed runs); report bytes freed.

    Example: cwa db gc --dry-run
    """
    from cwa.store.transfer import collect_garbage

    result = collect_garbage(existing_store(ctx), dry_run=dry_run)
    if state(ctx).json:
        _output.emit_json(
            {
                "dry_run": dry_run,
                "removed": [{"name": n, "bytes": b} for n, b in result.removed],
                "bytes_freed": 0 if dry_run else result.freed,
                "bytes_reclaimable": result.freed,
            }
        )
        return
    if result.removed:
        rows = [(n, _output.human_bytes(b)) for n, b in result.removed]
        _output.stdout.print(_output.table(("artifacts entry", "size"), rows))
    verb = "Would free" if dry_run else "Freed"
    _output.info(
        f"{verb} {_output.human_bytes(result.freed)} ({result.freed} bytes) in "
        f"{len(result.removed)} entr{'y' if len(result.removed) == 1 else 'ies'} without a run."
    )
