"""A progress bar on stderr for the long steps of a backfill or a gap report (rich).

Shown only on a terminal: under a scheduler (Airflow) stderr is a log file, and a bar redrawn
there is noise; the summary line on stdout says what happened either way.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

#: (done, total) of one step.
Advance = Callable[[int, int], None]


class ProgressBar:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def step(self, description: str) -> Advance:
        """A new bar; the returned function moves it."""
        task = self._progress.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            self._progress.update(task, completed=done, total=total)

        return advance
