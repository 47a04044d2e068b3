"""A progress bar for long commands, on stderr so that stdout stays the data."""
from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30
REDRAW = 0.1  # seconds: a million records cost a few hundred redraws, not a million


class Progress:
    """One line redrawn in place: `label [####------]  40%  12,000 records  3.2 s`, or without the
    bar when the total is unknown. Draws nothing unless enabled; `enabled=None` means "when stderr
    is a terminal"."""

    def __init__(self, label: str, total: int | None, enabled: bool | None, unit: str = "records",
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = total if total and total > 0 else None
        self.unit = unit
        self.started = time.monotonic()
        self.drawn_at = 0.0
        self.done = 0
        self.count = 0
        self.width = 0

    def update(self, done: int, count: int | None = None) -> None:
        """`done` in the unit of the total (records, bytes); `count` the items to show, if not `done`."""
        self.done = done
        self.count = done if count is None else count
        if self.enabled:
            now = time.monotonic()
            if now - self.drawn_at >= REDRAW:
                self.drawn_at = now
                self._draw(now)

    def finish(self, count: int | None = None) -> None:
        if count is not None:
            self.count = count
        if self.enabled:
            if self.total is not None:
                self.done = self.total
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        parts = [self.label]
        if self.total is not None:
            fraction = min(1.0, self.done / self.total)
            filled = int(fraction * WIDTH)
            parts.append(f"[{'#' * filled}{'-' * (WIDTH - filled)}] {fraction:4.0%}")
        parts.append(f"{self.count:,} {self.unit}")
        parts.append(f"{now - self.started:.1f} s")
        line = "  ".join(parts)
        # Padded over the previous line rather than cleared with an escape: a log file gets no
        # control sequences besides the carriage return.
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)
