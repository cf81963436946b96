"""A Flower Grid that gives up when too few SuperNodes stay connected (the node deadline).

Shared by the KidneyScan ServerApp, the SecAgg+ apps and the smoke app: it sits below all of
them and imports none of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.serverapp import Grid

LOGGER = logging.getLogger(__name__)


class NodesUnavailableError(RuntimeError):
    """Fewer SuperNodes than the minimum stayed connected for longer than the deadline."""


class NodeDeadlineGrid(Grid):
    """A Grid that gives up when too few SuperNodes are connected for too long.

    Flower's strategies wait in ``sample_nodes`` with no time limit ("Waiting for nodes to
    connect") whenever fewer than ``min_available_nodes`` are online, at start-up or after
    hospitals drop out. They poll ``grid.get_node_ids()`` every second, so raising there ends the
    run with a clear error instead of hanging.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid handed to ``@app.main()``.
    min_nodes : int
        Minimum number of connected SuperNodes.
    timeout_s : float
        How long the count may stay below ``min_nodes`` before :class:`NodesUnavailableError`.
    """

    def __init__(self, grid: Any, min_nodes: int, timeout_s: float) -> None:
        if min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {min_nodes}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.grid = grid
        self.min_nodes = int(min_nodes)
        self.timeout_s = float(timeout_s)
        self._short_since: float | None = None

    # -- the one method with behaviour ------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids; raises after ``timeout_s`` below ``min_nodes``."""
        ids = list(self.grid.get_node_ids())
        if len(ids) >= self.min_nodes:
            self._short_since = None
            return ids
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
            LOGGER.warning(
                "%d of the minimum %d SuperNodes connected; waiting up to %.0f s",
                len(ids),
                self.min_nodes,
                self.timeout_s,
            )
        elif now - self._short_since > self.timeout_s:
            raise NodesUnavailableError(
                f"only {len(ids)} of the minimum {self.min_nodes} SuperNodes were connected "
                f"for {self.timeout_s:.0f} s (node-timeout); check that every hospital's "
                "flower-supernode is running and can reach the SuperLink"
            )
        return ids

    # -- plain delegation -------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        """Delegate to the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """Run of the wrapped grid."""
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        """Delegate to the wrapped grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_nodes(self):  # type: ignore[no-untyped-def]
        """Delegate to the wrapped grid."""
        return self.grid.get_nodes()

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        """Delegate to the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        """Delegate to the wrapped grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        """Delegate to the wrapped grid."""
        return self.grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        # Anything else a Grid implementation offers (only called for missing attributes).
        if name == "grid":
            raise AttributeError(name)
        return getattr(self.grid, name)


def wait_for_nodes(grid: Any, min_nodes: int, timeout_s: float, poll_s: float = 1.0) -> list[int]:
    """Block until ``min_nodes`` SuperNodes are connected, or raise after ``timeout_s``.

    Raises
    ------
    NodesUnavailableError
        When the deadline passes first; the message says how many connected.
    """
    guarded = NodeDeadlineGrid(grid, min_nodes, timeout_s)
    while True:
        ids = list(guarded.get_node_ids())
        if len(ids) >= min_nodes:
            return ids
        time.sleep(poll_s)
