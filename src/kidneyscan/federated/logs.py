"""Flower's and Ray's log lines go to one file in the run folder, not to the console.

A simulation prints many Flower lines per round and, through Ray, every client's lines again on
the driver. :func:`to_file` points the ``flwr`` and ``kidneyscan`` loggers of this process at
``<run>/flower.log`` (each line once, with its process id); the ClientApps, which run in Ray
workers, do the same through :func:`from_env` with the path the driver put in
:data:`LOG_ENV`. The console keeps only the rounds' one-line summaries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Environment variable naming the run's log file (inherited by Ray workers).
LOG_ENV = "KIDNEYSCAN_FED_LOG"
_FORMAT = "%(asctime)s pid %(process)d %(name)s %(levelname)s: %(message)s"
_LOGGERS = ("flwr", "kidneyscan")


def _attach(path: Path) -> list[tuple[logging.Logger, list[logging.Handler], bool, int]]:
    saved = []
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.set_name(f"kidneyscan-run-log:{path}")
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate, logger.level))
        logger.handlers = [handler]
        logger.propagate = False  # not again through the root logger's console handler
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    return saved


@contextmanager
def to_file(path: str | Path) -> Iterator[Path]:
    """Within the block, this process's Flower and KidneyScan log lines go to ``path`` only.

    Also sets :data:`LOG_ENV` so that worker processes started inside the block follow.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get(LOG_ENV)
    os.environ[LOG_ENV] = str(path)
    saved = _attach(path)
    try:
        yield path
    finally:
        for logger, handlers, propagate, level in saved:
            for h in logger.handlers:
                h.close()
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        if previous is None:
            os.environ.pop(LOG_ENV, None)
        else:
            os.environ[LOG_ENV] = previous


def from_env() -> None:
    """In a worker: follow the driver's :data:`LOG_ENV` (once per process; no-op without it)."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    name = f"kidneyscan-run-log:{path}"
    if any(h.get_name() == name for h in logging.getLogger("flwr").handlers):
        return
    _attach(Path(path))
