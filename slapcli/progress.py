"""Progress bars and messages, always on stderr: stdout carries data only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def stderr_console(quiet: bool = False) -> Console:
    return Console(stderr=True, quiet=quiet, highlight=False)


class Reporter:
    """What a stage may tell the user: progress bars (when not quiet) and log lines (always on stderr).

    `bars=False` keeps the log lines and the final line but draws no bars (while reading stdin, a bar would
    only fight the producer for the terminal).
    """

    def __init__(self, quiet: bool = False, bars: bool = True) -> None:
        self.quiet = quiet
        self.console = stderr_console(quiet)
        # Bars only on a terminal: in a log file a bar is one stale line (or a blank one) per phase.
        self.bars = bars and not quiet and self.console.is_terminal

    def log(self, message: str) -> None:
        # soft_wrap: one message, one line, however narrow the terminal (or 80 columns when stderr is a file)
        self.console.print(message, soft_wrap=True)

    def warn(self, message: str) -> None:
        # Warnings print even under --quiet: they change what the user gets.
        Console(stderr=True, highlight=False).print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: float | None, unit: str = "rows") -> Iterator[ProgressTask]:
        if not self.bars:
            yield ProgressTask(None, None)
            return
        columns = [
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn() if unit == "rows" else TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        # Transient: a finished phase's bar leaves the screen (the log lines say what it did), so no spinner of a
        # phase that is over ("tokenize 0/30") stays behind.
        with Progress(*columns, console=self.console, transient=True) as progress:
            task_id = progress.add_task(description, total=total, rate="")
            yield ProgressTask(progress, task_id)


class ProgressTask:
    """One bar. It may count rows, or bytes of the input (when the row count is unknown up front)."""

    def __init__(self, progress: Progress | None, task_id: object) -> None:
        self._progress = progress
        self._task_id = task_id

    def update(self, *, advance: float = 0.0, completed: float | None = None, rows_done: int | None = None) -> None:
        if self._progress is None:
            return
        task = next(t for t in self._progress.tasks if t.id == self._task_id)
        fields = {}
        if rows_done is not None and task.elapsed:
            fields["rate"] = f"{rows_done:,} rows, {rows_done / task.elapsed:,.0f} rows/s"
        if completed is not None:
            self._progress.update(self._task_id, completed=completed, **fields)  # type: ignore[arg-type]
        else:
            self._progress.update(self._task_id, advance=advance, **fields)  # type: ignore[arg-type]
