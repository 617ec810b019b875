"""``cwa model``: look at a model through cwa's architecture map."""

from __future__ import annotations

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import reporter_for
from cwa_cli._options import DeviceOpt, DtypeOpt, TrustRemoteCodeOpt
from cwa_cli._state import state

app = typer.Typer(help="Inspect models as cwa sees them.", no_args_is_help=True)


@app.command("inspect")
@error_boundary
def inspect_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hugging Face name, local folder, or 'toy'."),
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Layers x components with parameter counts, head counts and head dims.

    Example: cwa model inspect toy
    """
    from cwa.models.inspect import inspect_model
    from cwa.models.loading import load_model

    with reporter_for(ctx) as reporter:
        loaded = load_model(
            model,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            reporter=reporter,
        )
    info = inspect_model(loaded)
    if state(ctx).json:
        _output.emit_json(info)
        return
    head = {k: v for k, v in info.items() if not isinstance(v, (list, dict))}
    _output.stdout.print(_output.table(("field", "value"), head.items()))
    rows = info.get("rows", [])
    if rows:
        columns = list(rows[0].keys())
        _output.stdout.print(_output.table(columns, [[r.get(c) for c in columns] for r in rows]))
