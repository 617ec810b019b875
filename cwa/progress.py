"""Progress reporting through an injected callback.

Library code never prints. Long loops call ``reporter.task(...)`` to obtain a handle and
advance it; the CLI supplies a Rich implementation drawing bars on stderr, tests and
library users get :data:`NULL_REPORTER` (silent) or their own implementation.
"""

from __future__ import annotations

from typing import Protocol


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

