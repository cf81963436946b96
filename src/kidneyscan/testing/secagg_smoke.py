"""The smoke model under secure aggregation (SecAgg+): checks the protocol in seconds.

The softmax regression of :mod:`kidneyscan.testing.smoke` as a legacy ``NumPyClient``, so a
SecAgg+ round on a real SuperLink takes seconds and the tests can recompute every client's
update in the clear (:func:`local_update`) to compare with the secure aggregate. Components:
``kidneyscan.testing.secagg_smoke:server_app`` / ``:client_app``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.client import NumPyClient

from kidneyscan.federated import secagg
from kidneyscan.testing import smoke


def _smoke_initial(config: Mapping[str, Any]) -> list[np.ndarray]:
    return list(smoke.initial_weights().values())


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
):
    """SecAgg+ ServerApp over the smoke model.

    See :func:`kidneyscan.federated.secagg.make_server_app` for ``overrides`` and ``on_round``.
    """
    # The smoke defaults sit under the caller's overrides, as in the smoke app itself.
    defaults = dict(smoke.DEFAULTS) | dict(overrides or {})
    return secagg.make_server_app(_smoke_initial, overrides=defaults, on_round=on_round)


def make_client_app(overrides: Mapping[str, Any] | None = None):
    """SecAgg+ ClientApp whose hospitals run :class:`SmokeNumPyClient`."""
    return secagg.make_client_app(lambda context: SmokeNumPyClient(context, overrides))


class SmokeNumPyClient(NumPyClient):
    """The smoke app's softmax regression as a legacy ``NumPyClient`` (for SecAgg+)."""

    def __init__(self, context: Any, overrides: Mapping[str, Any] | None = None) -> None:
        self.config = smoke.merged_config(context.run_config, overrides)
        self.partition_id = int(context.node_config.get("partition-id", 0))

    def get_parameters(self, config: Mapping[str, Any]) -> list[np.ndarray]:
        """Initial parameters (only used when the server has none)."""
        return list(smoke.initial_weights().values())

    def fit(
        self, parameters: list[np.ndarray], config: Mapping[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train locally; only parameters, the example count and the loss go back."""
        server_round = int(config.get("server-round", 0))
        return local_update(parameters, self.partition_id, self.config, server_round)


def local_update(
    parameters: list[np.ndarray],
    partition_id: int,
    config: Mapping[str, Any],
    server_round: int = 0,
) -> tuple[list[np.ndarray], int, dict[str, Any]]:
    """One hospital's smoke update, deterministic in (parameters, partition, config).

    Tests recompute it to get the plain-FedAvg reference for the SecAgg+ aggregate. The fault
    drill ``fail-partition`` raises in every round, or only in ``fail-round`` when that is > 0.
    """
    fail_round = int(config.get("fail-round", 0))
    if partition_id == int(config.get("fail-partition", -1)) and fail_round in (0, server_round):
        raise RuntimeError(
            f"fault drill: partition {partition_id} fails during training in round {server_round}"
        )
    x, labels = smoke.synthetic_partition(partition_id, seed=int(config.get("seed", 0)))
    weights = dict(zip(("weight", "bias"), parameters, strict=True))
    new, loss = smoke.local_train(
        weights, x, labels, int(config.get("local-epochs", 5)), float(config.get("lr", 0.5))
    )
    return [new["weight"], new["bias"]], len(labels), {"train-loss": loss}


#: Components for a ``flwr run`` app directory, to check SecAgg+ on a deployment in seconds.
server_app = make_server_app()
client_app = make_client_app()
