"""Live progress of a followed job on stderr: a rich progress line on a terminal, plain lines otherwise.

On a terminal the line shows elapsed time, a bar, the percent, then status, attempt, phase and
message, fitted to stderr's own width (measured at each update, so a resize is followed, and
never wrapped: the text is cut with an ellipsis). When stderr is not a terminal (a log, a pipe)
each change is one plain line, so nothing there is redrawn.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Final, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Column

BAR_WIDTH: Final = 24  # of the plain lines
DEFAULT_COLUMNS: Final = 80


def snapshot_percent(snapshot: dict[str, Any]) -> float:
    """The percent of a job (or event) snapshot, 100 once completed, within 0..100."""
    progress = snapshot.get("progress") or {}
    percent = float(progress.get("percent") or 0.0)
    if snapshot.get("status") == "completed":
        percent = 100.0
    return max(0.0, min(percent, 100.0))


def snapshot_detail(snapshot: dict[str, Any]) -> str:
    """Status, attempt (from the second on), phase and message, two spaces apart."""
    progress = snapshot.get("progress") or {}
    parts = [str(snapshot.get("status", "?"))]
    attempts = snapshot.get("attempts")
    if isinstance(attempts, int) and attempts > 1:
        parts.append(f"attempt {attempts}")
    for key in ("phase", "message"):
        if progress.get(key):
            parts.append(" ".join(str(progress[key]).split()))  # one line, whatever it holds
    return "  ".join(parts)


def plain_line(snapshot: dict[str, Any], elapsed_s: float) -> str:
    """One line for a log: elapsed time, bar, percent and details."""
    percent = snapshot_percent(snapshot)
    filled = round(BAR_WIDTH * percent / 100)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    minutes, seconds = divmod(int(elapsed_s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}  [{bar}] {percent:5.1f}%  {snapshot_detail(snapshot)}"


def terminal_columns(stream: TextIO) -> int:
    """Width of the terminal `stream` writes to (not stdout's: stdout may be a file)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or DEFAULT_COLUMNS
    except (OSError, ValueError):
        return DEFAULT_COLUMNS


class ProgressDisplay:
    """Shows job snapshots as they come; `close()` ends the display (leaving its last line)."""

    def __init__(self, stream: TextIO, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.live = stream.isatty()
        self.last = ""
        self._progress: Progress | None = None
        if self.live:
            self._console = Console(file=stream, width=terminal_columns(stream), highlight=False)
            self._bar = BarColumn(bar_width=10, table_column=Column(no_wrap=True))
            self._progress = Progress(
                TimeElapsedColumn(table_column=Column(no_wrap=True)),
                self._bar,
                TaskProgressColumn(table_column=Column(no_wrap=True)),
                TextColumn(
                    "{task.fields[detail]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)
                ),
                console=self._console,
                expand=True,
                refresh_per_second=4,
            )
            self._task = self._progress.add_task("job", total=100, detail="submitted")
            self._progress.start()

    def update(self, snapshot: dict[str, Any]) -> None:
        """Show `snapshot` (a job or an event's data)."""
        if self._progress is None:
            line = plain_line(snapshot, self.clock() - self.started)
            if line.split("  ", 1)[1] != self.last.split("  ", 1)[-1]:  # a change, not a new second
                self.stream.write(line + "\n")
                self.stream.flush()
            self.last = line
            return
        columns = terminal_columns(self.stream)
        self._console.width = columns
        self._bar.bar_width = max(5, min(40, columns // 5))
        self._progress.update(
            self._task, completed=snapshot_percent(snapshot), detail=snapshot_detail(snapshot)
        )

    def close(self) -> None:
        """Draw the last state and stop redrawing."""
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
            self._progress = None
