"""The CLI's single error boundary.

Known errors (:class:`cwa.errors.CwaError`) become one ``Error: <message>`` line on stderr and
exit code 1 (2 for usage errors); Ctrl-C exits 130 with a one-line note. Anything unexpected is
also reduced to one line, with a pointer to ``CWA_DEBUG=1`` which re-raises with the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from cwa.errors import CwaError

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get("CWA_DEBUG", "").strip() not in ("", "0", "false", "no")


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def fail(message: str, code: int = 1) -> typer.Exit:
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


def error_boundary(func: F) -> F:
    """Wrap a Typer command so that errors end the process the documented way."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except CwaError as exc:
            if debug_enabled():
                raise
            raise fail(_one_line(str(exc)) or type(exc).__name__, exc.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            sys.stderr.write("Interrupted.\n")
            raise typer.Exit(130) from None
        except Exception as exc:
            if debug_enabled():
                raise
            detail = _one_line(str(exc))
            raise fail(
                f"unexpected {type(exc).__name__}: {detail} (this is a bug in cwa; rerun with "
                "CWA_DEBUG=1 for the traceback and report it)"
            ) from None

    return wrapper  # type: ignore[return-value]
