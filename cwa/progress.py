"""Progress reporting through an injected callback.

Library code never prints. Long loops call ``reporter.task(...)`` to obtain a handle and
advance it; the CLI supplies a Rich implementation drawing bars on stderr, tests and
library users get :data:`NULL_REPORTER` (silent) or their own implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class TaskHandle(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class Reporter(Protocol):
    """What the library needs from a UI: progress bars, status lines, warnings."""

    def task(self, description: str, total: int | None = None) -> TaskHandle: ...

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class NullReporter:
    """A reporter that discards everything."""

    def task(self, description: str, total: int | None = None) -> TaskHandle:
        return _NullTask()

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass


class RecordingReporter(NullReporter):
    """Keeps every info and warning message (useful in tests and notebooks)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    def info(self, message: str) -> None:
        self.messages.append(("info", message))

    def warn(self, message: str) -> None:
        self.messages.append(("warn", message))

    @property
    def warnings(self) -> list[str]:
        return [m for level, m in self.messages if level == "warn"]


NULL_REPORTER = NullReporter()


def track(
    items: Iterable[T], reporter: Reporter | None, description: str, total: int | None = None
) -> Iterator[T]:
    """Iterate ``items`` while advancing a progress task."""
    reporter = reporter or NULL_REPORTER
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    handle = reporter.task(description, total)
    try:
        for item in items:
            yield item
            handle.advance()
    finally:
        handle.close()
