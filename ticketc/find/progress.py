"""Progress of one level while it trains: a rich bar on a terminal, else a line per evaluation.

A bar is useless in a log file or a pipe (rich draws nothing there until it ends), so when the
output is not a terminal each evaluation prints one line with the iteration, the accuracy so
far and the time left, and a long stretch between evaluations prints a line at least every
`HEARTBEAT_S` seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

Log = Callable[[str], None]
HEARTBEAT_S = 60.0  # longest silence between progress lines when not on a terminal


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class LevelProgress:
    """Reports iterations start+1 .. end of one level.

    mode: "bar" (rich progress bar), "lines" (one line per evaluation through `log`) or None.
    tickets: indices of the members whose accuracy the lines show (one per run).
    """

    def __init__(
        self,
        mode: str | None,
        label: str,
        start: int,
        end: int,
        log: Log | None,
        tickets: Sequence[int],
    ) -> None:
        self.mode = mode if (mode != "lines" or log is not None) else None
        self.label, self.start, self.end = label, start, end
        self.log, self.tickets = log, list(tickets)
        self._bar: Any = None
        self._task: Any = None
        self._began = self._last_line = time.perf_counter()

    @staticmethod
    def mode_for(enabled: bool) -> str | None:
        """ "bar" on a terminal, "lines" otherwise, None when disabled."""
        if not enabled:
            return None
        return "bar" if sys.stdout.isatty() else "lines"

    def __enter__(self) -> LevelProgress:
        self._began = self._last_line = time.perf_counter()
        if self.mode == "bar":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.end - self.start)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def iteration(self, it: int) -> None:
        """Called after every optimizer step (iteration `it`)."""
        if self._bar is not None and ((it - self.start) % 50 == 0 or it == self.end):
            self._bar.update(self._task, completed=it - self.start)
        elif self.mode == "lines" and it < self.end:
            now = time.perf_counter()
            if now - self._last_line >= HEARTBEAT_S:
                assert self.log is not None
                self.log(f"{self.label}: iteration {it}/{self.end}, {self._times(it, now)}")
                self._last_line = now

    def _times(self, it: int, now: float) -> str:
        elapsed = now - self._began
        done = it - self.start
        left = elapsed / done * (self.end - it) if done else 0.0
        return f"{_duration(elapsed)} elapsed, {_duration(left)} left"

    def evaluation(self, it: int, rows: list[dict[str, float]]) -> None:
        """Called with every member's evaluation row at iteration `it`."""
        if self.mode is None:
            return
        rows = [rows[i] for i in self.tickets]
        key = "val_acc" if rows[0]["val_acc"] == rows[0]["val_acc"] else "test_acc"  # NaN: none
        acc = "/".join(f"{100 * r[key]:.2f}" for r in rows)
        loss = "/".join(f"{r['train_loss']:.3f}" for r in rows)
        metric = "validation" if key == "val_acc" else "test"
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.label}: {metric} acc {acc}%")
            return
        now = time.perf_counter()
        assert self.log is not None
        self.log(
            f"{self.label}: iteration {it}/{self.end}, train loss {loss}, {metric} "
            f"accuracy {acc}%, {self._times(it, now)}"
        )
        self._last_line = now
