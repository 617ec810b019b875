"""A Rich implementation of the library's Reporter: progress bars and messages on stderr."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cwa.progress import NULL_REPORTER, TaskHandle
from cwa_cli import _output


class _RichTask:
    def __init__(self, reporter: RichReporter, task_id: int) -> None:
        self._reporter = reporter
        self._task_id = task_id

    def advance(self, n: int = 1) -> None:
        self._reporter.progress.advance(self._task_id, n)

    def close(self) -> None:
        self._reporter.progress.remove_task(self._task_id)
        self._reporter._task_closed()


class RichReporter:
    """Progress bars on stderr; silent bars (but warnings kept) with ``quiet``."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=_output.stderr,
            transient=True,
        )
        self._open = 0
        self._started = False

    def task(self, description: str, total: int | None = None) -> TaskHandle:
        if self.quiet:
            return NULL_REPORTER.task(description, total)
        if not self._started:
            self.progress.start()
            self._started = True
        self._open += 1
        return _RichTask(self, self.progress.add_task(description, total=total))

    def _task_closed(self) -> None:
        # Keep the live display running between tasks: stopping and restarting it would leave
        # a blank line on stderr each time. It stops once, in stop().
        self._open -= 1

    def info(self, message: str) -> None:
        if not self.quiet:
            self.progress.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.progress.console.print(f"[yellow]Warning:[/yellow] {message}", highlight=False)

    def stop(self) -> None:
        if self._started:
            self._open = 0
            self._started = False
            self.progress.stop()
