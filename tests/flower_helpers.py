"""One hand-made Flower training round on a product strategy (no simulation, no network).

Messages need the ``task_identity`` fixture (conftest.py) outside a Flower process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from kidneyscan.federated import task


class Grid:
    """The one Grid call a strategy's ``configure_train`` makes: which nodes are connected."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def train_round(
    strategy: Any,
    server_round: int,
    start: np.ndarray,
    updates: Sequence[np.ndarray],
    sizes: Sequence[int],
) -> np.ndarray:
    """Send ``start`` to 3 nodes, let node i answer ``updates[i]``, return the aggregate."""
    sent = list(
        strategy.configure_train(
            server_round, ArrayRecord({"w": Array(start)}), ConfigRecord(), Grid()
        )
    )
    replies = [
        Message(
            RecordDict({
                "arrays": ArrayRecord({"w": Array(u.copy())}),
                "metrics": MetricRecord({"num-examples": n, task.UNIT_WEIGHT_KEY: 1}),
            }),
            reply_to=msg,
        )
        for msg, u, n in zip(sent, updates, sizes, strict=True)
    ]  # fmt: skip
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return np.asarray(arrays["w"].numpy())
