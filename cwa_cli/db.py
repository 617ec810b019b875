"""``cwa db``: store status and migrations."""

from __future__ import annotations

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
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
