"""The KidneyScan model trained under secure aggregation (SecAgg+): the Flower components.

``kidneyscan.federated.secagg_app:server_app`` / ``:client_app`` are what a deployed app
directory names (:func:`kidneyscan.federated.deploy.write_kidneyscan_secagg_app`). Same data,
model and local training as the Message-API apps (:mod:`kidneyscan.federated.task`); only the
trainable tensors travel, masked. The protocol itself is in :mod:`kidneyscan.federated.secagg`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.client import NumPyClient

from kidneyscan.federated import secagg, task
from kidneyscan.federated.client_app import keep_optimizer_state, kept_optimizer_state

LOGGER = logging.getLogger(__name__)


class KidneyScanNumPyClient(NumPyClient):
    """One hospital training the KidneyScan model for SecAgg+ (legacy ``NumPyClient``).

    Same data, model and local training as the Message-API ClientApp
    (:mod:`kidneyscan.federated.task`); only the trainable tensors travel, masked.
    """

    def __init__(self, context: Any) -> None:
        self.task = task
        self.cfg = task.run_config(_kidneyscan_keys(context.run_config))
        self.node_config = dict(context.node_config)
        self.node_context = context  # its state keeps the AdamW moments (optimizer-state=keep)

    def get_parameters(self, config: Mapping[str, Any]) -> list[np.ndarray]:
        """Trainable tensors of the seeded initial model."""
        return list(self.task.get_trainable(self.task.build_model(self.cfg)))

    def fit(
        self, parameters: list[np.ndarray], config: Mapping[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train locally on this hospital's images; return tensors, example count, loss."""
        task, cfg = self.task, self.cfg
        model = task.build_model(cfg)
        task.set_trainable(model, parameters)
        samples = task.load_client_samples(cfg, self.node_config)
        train, _ = task.split_local(samples, float(cfg["local-val-fraction"]), int(cfg["seed"]))
        server_round = int(config.get("server-round", 1))
        stats = task.train_local(
            model,
            train,
            cfg,
            server_round=server_round,
            optimizer_state=kept_optimizer_state(cfg, self.node_context),
        )
        keep_optimizer_state(self.node_context, stats)
        arrays = list(task.get_trainable(model))
        limit = float(cfg.get("secagg-clipping-range", 8.0))
        peak = max(float(np.abs(a).max()) for a in arrays if a.size)
        if peak > limit:
            # SecAgg+ clips silently; say so, because the aggregate would be wrong.
            LOGGER.warning(
                "a parameter reaches %.2f, beyond secagg-clipping-range %.1f: it will be clipped",
                peak,
                limit,
            )
        return arrays, int(stats["num-examples"]), {"train-loss": float(stats["loss"])}


def _kidneyscan_keys(run_config: Mapping[str, Any]) -> dict[str, Any]:
    # Keys of this module and of the smoke client are not KidneyScan training settings.
    skip = set(secagg.DEFAULTS) | {"fail-partition", "fail-round", "slow-partition", "slow-seconds"}
    return {k: v for k, v in run_config.items() if k not in skip}


def _kidneyscan_initial(config: Mapping[str, Any]) -> list[np.ndarray]:
    cfg = task.run_config(_kidneyscan_keys(config))
    return list(task.get_trainable(task.build_model(cfg)))


def make_kidneyscan_apps(
    overrides: Mapping[str, Any] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
):
    """ServerApp and ClientApp training the KidneyScan model with SecAgg+.

    The run config is KidneyScan's (``task.DEFAULTS``: model, partition-file, ...) plus the
    SecAgg+ keys of :mod:`kidneyscan.federated.secagg`. The server writes no checkpoint: it
    holds only the masked sum of each round (``on_round`` receives the aggregate).
    """
    server = secagg.make_server_app(_kidneyscan_initial, overrides=overrides, on_round=on_round)
    client = secagg.make_client_app(KidneyScanNumPyClient)
    return server, client


#: Components for a ``flwr run`` app directory.
# Two plain assignments: Flower's app validation looks the names up statically.
_APPS = make_kidneyscan_apps()
server_app = _APPS[0]
client_app = _APPS[1]
