"""The DuckDB experiment store: runs, lineage, results and artifacts (see DESIGN.md)."""

from cwa.store.runs import RunDetails, RunRecord, delete_run, list_runs, resolve_run_id, run_details
from cwa.store.store import Store, StoreInfo, default_store_path

__all__ = [
    "RunDetails",
    "RunRecord",
    "Store",
    "StoreInfo",
    "default_store_path",
    "delete_run",
    "list_runs",
    "resolve_run_id",
    "run_details",
]
