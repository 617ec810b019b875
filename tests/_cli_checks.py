"""Checks of how the CLI refuses bad input: one ``Error: ...`` line, the right exit code, no
traceback (DESIGN.md's error boundary)."""

from __future__ import annotations

from typing import Any


def assert_one_line_error(result: Any, fragment: str) -> None:
    """Exit code 1 and stderr is exactly one ``Error: `` line containing ``fragment``."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], lines


def assert_error_is_last_line(result: Any, fragment: str) -> None:
    """A non-zero exit whose stderr (progress chatter allowed before it) ends with its one
    ``Error: `` line, containing ``fragment``, and shows no traceback."""
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and fragment in errors[0], lines
    assert "Traceback" not in result.stderr
