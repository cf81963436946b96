"""Console logging of the batch commands: a line that repeats (a fallback warning per slice) is
shown once, then counted, and the count is printed when the command ends.

The kidney-band and kidney-mask steps log a fallback for each slice they cannot place (on the
real sample, about one slice in ten has no kidney the anatomy segmentation finds), so over a
dataset the console filled with one identical line per slice. The service keeps its per-request
lines: there each line belongs to one upload.
"""

from __future__ import annotations

import atexit
import logging
import sys
from typing import TextIO


class RepeatSummary(logging.Filter):
    """Lets each distinct line through once (per logger, level and formatted message) and
    counts the identical repeats it holds back; errors always pass."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """True for a message's first occurrence (and any error); False for its repeats."""
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.levelno, record.getMessage())
        seen = self.counts.get(key, 0)
        self.counts[key] = seen + 1
        return seen == 0

    def summary(self) -> list[str]:
        """One line per message that repeated: the message and how often it was logged."""
        return [
            f"{logging.getLevelName(level)} {msg} ({n} times in all; shown once above)"
            for (_, level, msg), n in self.counts.items()
            if n > 1
        ]

    def report(self, stream: TextIO | None = None) -> None:
        """Print :meth:`summary` to ``stream`` (stderr by default) and start counting anew."""
        lines = self.summary()
        if lines:
            print("\n".join(lines), file=stream or sys.stderr, flush=True)
        self.counts.clear()


def setup_console_logging(level: int) -> RepeatSummary:
    """Root logging to the console through Rich, each distinct line once; returns the filter.

    When the command ends (its Click context closes; at interpreter exit outside a command) the
    repeat counts are printed and the filter is taken off again, so nothing is held back
    without being counted on the console.
    """
    import click
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, show_time=False)
    repeats = RepeatSummary()
    handler.addFilter(repeats)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)

    def close() -> None:
        handler.removeFilter(repeats)
        repeats.report()

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(close)
    else:
        atexit.register(close)
    return repeats
