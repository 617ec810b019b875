"""``cwa toy``: build and describe the offline toy world (model, tokenizer, data, tasks)."""

from __future__ import annotations

from typing import Annotated

import typer

from cwa_cli import _output
from cwa_cli._boundary import error_boundary
from cwa_cli._common import reporter_for
from cwa_cli._state import state

app = typer.Typer(help="The built-in toy language, model and task sets.", no_args_is_help=True)

VariantOpt = Annotated[str, typer.Option("--variant", help="gpt2 (default) or llama (GQA twin).")]


@app.command("build")
@error_boundary
def build_cmd(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False,
    variant: VariantOpt = "gpt2",
) -> None:
    """Build (or reuse) the toy model and its data files in the cache (CWA_CACHE).

    Example: cwa toy build --force
    """
    from cwa.toy import ensure_toy_model, toy_data_path

    with reporter_for(ctx) as reporter:
        path = ensure_toy_model(variant, force=force, reporter=reporter)
        files = {
            name: str(toy_data_path(name))
            for name in ("calibration", "heldout", "hellaswag", "lambada")
        }
    if state(ctx).json:
        _output.emit_json({"model": str(path), "data": files})
    else:
        _output.stdout.print(
            _output.table(("item", "path"), [("model", str(path)), *files.items()])
        )


@app.command("info")
@error_boundary
def info_cmd(ctx: typer.Context) -> None:
    """Where the toy world lives, whether it is built, and its training figures."""
    from cwa.toy import toy_info

    info = toy_info()
    if state(ctx).json:
        _output.emit_json(info)
        return
    rows = [(k, _output.to_json(v) if isinstance(v, (dict, list)) else v) for k, v in info.items()]
    _output.stdout.print(_output.table(("field", "value"), rows))
