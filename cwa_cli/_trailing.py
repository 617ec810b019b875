"""``--json`` and ``--quiet`` accepted after the subcommand too (``cwa model inspect toy --json``).

Click reads a group's options only before the subcommand's name. Rather than repeating the two
flags in every command's signature, :func:`accept_trailing_output_flags` wraps every registered
command callback once (at import of ``cwa_cli.main``) with hidden ``--json``/``--quiet``
options that set the same :class:`~cwa_cli._state.CliState` fields as the global ones.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, get_type_hints

import typer

from cwa_cli._state import state

_JSON = "cwa_trailing_json"
_QUIET = "cwa_trailing_quiet"
_CTX = "cwa_trailing_ctx"


def with_output_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with hidden trailing ``--json``/``--quiet`` options (a no-op when it has them)."""
    signature = inspect.signature(fn, eval_str=True)
    if _JSON in signature.parameters:
        return fn
    hints = get_type_hints(fn, include_extras=True)
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
    ]
    ctx_name = next((p.name for p in params if p.annotation is typer.Context), None)
    keyword = inspect.Parameter.KEYWORD_ONLY
    extra = [
        inspect.Parameter(
            _JSON, keyword, default=False,
            annotation=Annotated[bool, typer.Option("--json", hidden=True)],
        ),
        inspect.Parameter(
            _QUIET, keyword, default=False,
            annotation=Annotated[bool, typer.Option("--quiet", "-q", hidden=True)],
        ),
    ]  # fmt: skip
    if ctx_name is None:
        extra.append(inspect.Parameter(_CTX, keyword, annotation=typer.Context))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json, quiet = kwargs.pop(_JSON, False), kwargs.pop(_QUIET, False)
        ctx = kwargs.pop(_CTX, None) if ctx_name is None else kwargs.get(ctx_name)
        if ctx is not None and (as_json or quiet):
            st = state(ctx)
            st.json = st.json or as_json
            st.quiet = st.quiet or quiet
        return fn(*args, **kwargs)

    new_params = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    wrapper.__signature__ = signature.replace(parameters=new_params + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in new_params + extra}
    return wrapper


def accept_trailing_output_flags(app: typer.Typer) -> None:
    """Wrap every command of ``app`` and of its sub-apps (see the module docstring)."""
    for command in app.registered_commands:
        if command.callback is not None:
            command.callback = with_output_flags(command.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            accept_trailing_output_flags(group.typer_instance)
