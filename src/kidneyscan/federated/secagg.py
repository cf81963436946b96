"""Secure aggregation (SecAgg+) for the federation: the server only ever sees the sum.

flwr 1.42 has no Message-API strategy for SecAgg+, so this runs Flower's legacy path: a
``LegacyContext`` holding a legacy ``flwr.server.strategy.FedAvg``, executed by
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` inside ``@app.main()``; on the
hospitals a ``NumPyClient`` behind ``flwr.client.mod.secaggplus_mod``. Each client masks
``[w, w * params]`` (``w`` = number of examples) with pairwise and private masks; the server
adds the masked vectors, removes the masks (reconstructing the secrets of clients that dropped
out from Shamir shares held by their neighbours) and divides, which gives FedAvg's weighted mean
up to quantisation (parameters are clipped to ``[-clipping_range, clipping_range]`` and
quantised to ``quantization_range`` levels).

Because the server sees only the sum, server-side clipping, DP noise on the server or robust
aggregation (median, Krum) cannot be combined with SecAgg+ here.

Run config keys: ``num-server-rounds``, ``min-clients``, ``node-timeout``, ``secagg-num-shares``
(default: all sampled clients), ``secagg-threshold`` (default: ``max(2, shares // 2 + 1)``),
``secagg-timeout`` (s each protocol stage waits for replies, default 60),
``secagg-clipping-range`` (8.0), ``secagg-quantization-range`` (2**22), plus the keys of the
client.

This module builds the apps around any client and initial parameters; the Flower components
that train the KidneyScan model are in :mod:`kidneyscan.federated.secagg_app`, the seconds-long
smoke model under SecAgg+ in :mod:`kidneyscan.testing.secagg_smoke`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from kidneyscan.federated.grid import NodeDeadlineGrid, NodesUnavailableError

LOGGER = logging.getLogger("kidneyscan.federated.secagg")

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 2,
    "min-clients": 2,
    "node-timeout": 60.0,
    "secagg-num-shares": 0,
    "secagg-threshold": 0,
    "secagg-timeout": 60.0,
    "secagg-clipping-range": 8.0,
    "secagg-quantization-range": 4194304,
}


def secagg_settings(config: Mapping[str, Any], num_clients: int) -> dict[str, Any]:
    """Resolve and check the SecAgg+ parameters for ``num_clients`` sampled clients.

    Raises
    ------
    ValueError
        When the shares / threshold cannot work (threshold above shares, fewer than 2 shares,
        more shares than clients).
    """
    shares = int(config.get("secagg-num-shares", 0)) or num_clients
    threshold = int(config.get("secagg-threshold", 0)) or max(2, shares // 2 + 1)
    if shares < 2:
        raise ValueError(f"secagg-num-shares must be >= 2, got {shares}")
    if shares > num_clients:
        raise ValueError(
            f"secagg-num-shares ({shares}) exceeds the number of clients ({num_clients})"
        )
    if not 2 <= threshold <= shares:
        raise ValueError(f"secagg-threshold must be in [2, {shares}], got {threshold}")
    timeout = float(config.get("secagg-timeout", 60.0))
    if not timeout > 0:
        raise ValueError(
            f"secagg-timeout must be > 0 s (the workflow would wait forever), got {timeout}"
        )
    return {
        "num_shares": shares,
        "reconstruction_threshold": threshold,
        "timeout": timeout,
        "clipping_range": float(config.get("secagg-clipping-range", 8.0)),
        "quantization_range": int(config.get("secagg-quantization-range", 4194304)),
    }


def make_server_app(
    initial_parameters: Callable[[Mapping[str, Any]], list[np.ndarray]],
    overrides: Mapping[str, Any] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
):
    """Build a SecAgg+ ServerApp.

    Parameters
    ----------
    initial_parameters : callable
        ``initial_parameters(config)`` returns the initial global parameters as a list of
        arrays (same order as the client's ``get_parameters``).
    overrides : mapping, optional
        Defaults for the run config, above :data:`DEFAULTS` (``run_simulation`` passes an empty
        run config).
    on_round : callable, optional
        Called after every round with ``{"round", "results", "failures", "parameters"}``:
        the securely aggregated parameters and how many clients were in / out.
    """

    class DeadlineClientManager(SimpleClientManager):
        """Legacy client manager that gives up after ``node-timeout`` instead of 24 h."""

        def __init__(self, node_timeout: float) -> None:
            super().__init__()
            self.node_timeout = node_timeout

        def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
            if super().wait_for(num_clients, timeout=int(min(timeout, self.node_timeout))):
                return True
            raise NodesUnavailableError(
                f"only {self.num_available()} of the minimum {num_clients} SuperNodes were "
                f"connected for {self.node_timeout:.0f} s (node-timeout)"
            )

    class RecordingFedAvg(FedAvg):
        """Legacy FedAvg that reports each securely aggregated round."""

        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            if failures:
                # Flower may report one dropout once per protocol stage; log the distinct ones.
                reasons = sorted({_last_line(str(f)) for f in failures})
                LOGGER.warning(
                    "round %d: client(s) dropped out of SecAgg+ (%s); aggregated the other %d",
                    server_round,
                    "; ".join(reasons),
                    len(results),
                )
            params, metrics = super().aggregate_fit(server_round, results, failures)
            record = {
                "round": server_round,
                "results": len(results),
                "failures": len(failures),
                "parameters": parameters_to_ndarrays(params) if params is not None else None,
                "metrics": dict(metrics or {}),
            }
            if on_round is not None:
                on_round(record)
            return params, metrics

    def weighted_loss(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        total = sum(n for n, _ in metrics)
        if not total:
            return {}
        return {"train-loss": sum(n * float(m["train-loss"]) for n, m in metrics) / total}

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = DEFAULTS | dict(overrides or {}) | dict(context.run_config)
        min_clients = int(config["min-clients"])
        node_timeout = float(config["node-timeout"])
        guarded = NodeDeadlineGrid(grid, min_clients, node_timeout)
        # Wait (bounded) for the federation so the share count can default to its size.
        t0 = time.monotonic()
        while len(list(guarded.get_node_ids())) < min_clients:
            time.sleep(1.0)
        num_clients = len(list(guarded.get_node_ids()))
        settings = secagg_settings(config, num_clients)
        LOGGER.info(
            "SecAgg+ with %d clients: %s (waited %.1f s)",
            num_clients,
            settings,
            time.monotonic() - t0,
        )
        strategy = RecordingFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=min_clients,
            min_available_clients=min_clients,
            initial_parameters=ndarrays_to_parameters(initial_parameters(config)),
            fit_metrics_aggregation_fn=weighted_loss,
            on_fit_config_fn=lambda server_round: {"server-round": server_round},
        )
        legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=int(config["num-server-rounds"])),
            strategy=strategy,
            client_manager=DeadlineClientManager(node_timeout),
        )
        workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(**settings))
        workflow(guarded, legacy)

    return app


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\\n", "\n").splitlines() if ln.strip()]
    return (lines[-1] if lines else text)[:200]


def make_client_app(client_fn: Callable[[Any], Any]) -> ClientApp:
    """Build a SecAgg+ ClientApp: ``client_fn(context)`` returns a ``NumPyClient``.

    Every message passes ``secaggplus_mod``, which masks the client's update.
    """

    def build(context: Any) -> Any:
        return client_fn(context).to_client()

    return ClientApp(client_fn=build, mods=[secaggplus_mod])
