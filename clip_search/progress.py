"""Progress of a long job: rich's bar on a terminal, else one log line every ``log_every`` seconds."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class JobProgress:
    """Counts documents done (and refused) and shows it: a rich bar, periodic log lines, or nothing."""

    def __init__(
        self,
        description: str,
        total: Optional[int] = None,
        bar: bool = False,
        log_every: Optional[float] = None,
        log_to: TextIO = sys.stderr,
    ):
        """:param bar: draw rich's progress bar (docs/s, ETA, refused)
        :param log_every: without a bar, print one line every so many seconds (None: print nothing)
        :param log_to: where the bar or the lines go
        """
        self.done = 0
        self.refused = 0
        self.started = time.monotonic()
        self._total = total
        self._log_every = log_every
        self._log_to = log_to
        self._last_log = self.started
        self._bar = _rich_bar(description, total, log_to) if bar else None

    def __enter__(self) -> 'JobProgress':
        if self._bar is not None:
            self._bar[0].start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._show()
            self._bar[0].stop()

    def advance(self, done: int = 0, refused: int = 0) -> None:
        self.done += done
        self.refused += refused
        self._show()

    @property
    def rate(self) -> float:
        """Documents per second since the start."""
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def _show(self) -> None:
        if self._bar is not None:
            progress, task = self._bar
            progress.update(task, completed=self.done + self.refused, refused=self.refused, rate=f'{self.rate:.0f}')
        elif self._log_every is not None and time.monotonic() - self._last_log >= self._log_every:
            self._last_log = time.monotonic()
            of = f' of {self._total:,}' if self._total else ''
            print(f'{self.done:,}{of} done, {self.refused:,} refused, {self.rate:.0f} docs/s', file=self._log_to, flush=True)


def _rich_bar(description: str, total: Optional[int], file: TextIO):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn('{task.description}'),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn('{task.fields[rate]} docs/s'),
        TextColumn('refused {task.fields[refused]}'),
        TextColumn('ETA'),
        TimeRemainingColumn(),
        console=Console(file=file),
    )
    task = progress.add_task(description, total=total, refused=0, rate=0)
    return progress, task
