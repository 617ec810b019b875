"""Global CLI options, parsed once by the root callback and shared with every command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer


@dataclass
class CliState:
    store: Path | None = None
    json: bool = False
    quiet: bool = False
    mlflow: bool | None = None  # None: follow CWA_MLFLOW


def state(ctx: typer.Context) -> CliState:
    """The CliState of this invocation (set by the root callback)."""
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState()
    return root.obj
