"""A seconds-long Flower app to check a federation before a real run (ports, TLS, auth, faults, DP).

Each hospital trains a softmax regression in NumPy on its own synthetic arrays (no torch, no
images), so one ClientApp process starts in about a second and a round on a real SuperLink takes
a few seconds instead of the ~18 s a torch app needs on two cores. It goes through exactly the
same deployment, privacy and fault-handling code as the KidneyScan app:
:func:`kidneyscan.federated.privacy.wrap_strategy`, :func:`~kidneyscan.federated.privacy.
client_mods` and :class:`kidneyscan.federated.grid.NodeDeadlineGrid`. It is test scaffolding
(the deployment tests, fault drills and ``deploy --smoke`` use it), kept in the package because
every SuperNode imports it from the installed ``kidneyscan``.

Run config (kebab-case, all optional): ``num-server-rounds`` (2), ``min-clients`` (2),
``node-timeout`` (s a round may wait for enough nodes, 60), ``round-timeout`` (s a round waits
for replies, 120), ``local-epochs`` (5), ``lr`` (0.5), ``seed`` (0), ``out-dir`` (write
``smoke_result.json`` there), the DP keys of :mod:`kidneyscan.federated.privacy`, and for fault
drills ``fail-partition`` (that partition raises in training) and ``slow-partition`` /
``slow-seconds`` (that partition sleeps before replying).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from kidneyscan.federated import privacy
from kidneyscan.federated.grid import NodeDeadlineGrid, NodesUnavailableError

LOGGER = logging.getLogger(__name__)

NUM_FEATURES = 16
NUM_CLASSES = 4
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 2,
    "min-clients": 2,
    "node-timeout": 60.0,
    "round-timeout": 120.0,
    "local-epochs": 5,
    "lr": 0.5,
    "seed": 0,
    "out-dir": "",
    "fail-partition": -1,
    "slow-partition": -1,
    "slow-seconds": 0.0,
}


def merged_config(run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None):
    """Defaults, then ``overrides`` (Python callers), then the run config from Flower."""
    config = dict(DEFAULTS)
    config.update(overrides or {})
    config.update(run_config)
    return config


def initial_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Zero-initialised softmax-regression weights (same on every hospital)."""
    del seed  # zeros: identical everywhere without sending a seed
    return {
        "weight": np.zeros((NUM_FEATURES, NUM_CLASSES), dtype=np.float32),
        "bias": np.zeros(NUM_CLASSES, dtype=np.float32),
    }


def synthetic_partition(
    partition_id: int, num_samples: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one hospital: a shared linear rule, site-specific shift.

    Parameters
    ----------
    partition_id : int
        Hospital index; ``-1`` gives the server's held-out set.
    num_samples : int, optional
        Defaults to ``24 + 8 * partition_id`` so hospitals differ in size (weighted average).
    seed : int
        Seed of the shared rule.
    """
    rule = np.random.default_rng(seed).normal(size=(NUM_FEATURES, NUM_CLASSES))
    n = num_samples if num_samples is not None else 24 + 8 * max(partition_id, 0)
    rng = np.random.default_rng([seed, partition_id + 1000])
    x = rng.normal(size=(n, NUM_FEATURES)) + 0.3 * (partition_id + 1)
    labels = np.argmax(x @ rule + 0.5 * rng.normal(size=(n, NUM_CLASSES)), axis=1)
    return x.astype(np.float32), labels.astype(np.int64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def local_train(
    weights: Mapping[str, np.ndarray],
    x: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    lr: float,
) -> tuple[dict[str, np.ndarray], float]:
    """Full-batch gradient descent on cross-entropy; returns new weights and the final loss."""
    w = np.array(weights["weight"], dtype=np.float64)
    b = np.array(weights["bias"], dtype=np.float64)
    onehot = np.eye(NUM_CLASSES)[labels]
    loss = float("nan")
    for _ in range(max(int(epochs), 0)):
        probs = _softmax(x @ w + b)
        loss = float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + 1e-12)))
        grad = (probs - onehot) / len(labels)
        w -= lr * x.T @ grad
        b -= lr * grad.sum(axis=0)
    return {"weight": w.astype(np.float32), "bias": b.astype(np.float32)}, loss


def accuracy(weights: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the softmax regression."""
    return float(np.mean(np.argmax(x @ weights["weight"] + weights["bias"], axis=1) == labels))


def make_client_app(overrides: Mapping[str, Any] | None = None):
    """Build the ClientApp; ``overrides`` replace defaults (``run_simulation`` has none)."""
    app = ClientApp()
    # Python callers (run_simulation) pass the DP mode in ``overrides``; deployed runs carry it
    # in the run config, which ``privacy.dp_mod`` reads per message.
    mods = privacy.client_mods(dict(overrides or {})) or [privacy.dp_mod]

    @app.train(mods=mods)
    def train(msg: Message, context: Context) -> Message:
        config = merged_config(context.run_config, overrides)
        pid = int(context.node_config.get("partition-id", 0))
        if pid == int(config["fail-partition"]):
            raise RuntimeError(f"fault drill: partition {pid} fails during training")
        if pid == int(config["slow-partition"]):
            if config["out-dir"]:
                # Lets a fault drill know the slow node is mid-round before it strikes.
                marker = Path(str(config["out-dir"])) / f"partition-{pid}.training"
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
            time.sleep(float(config["slow-seconds"]))
        x, labels = synthetic_partition(pid, seed=int(config["seed"]))
        arrays: ArrayRecord = msg.content.array_records["arrays"]
        weights = {k: v.numpy() for k, v in arrays.items()}
        new, loss = local_train(
            weights, x, labels, int(config["local-epochs"]), float(config["lr"])
        )
        # Only parameters and aggregate numbers leave the hospital.
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()}),
                "metrics": MetricRecord({"train-loss": loss, "num-examples": len(labels)}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def make_server_app(overrides: Mapping[str, Any] | None = None):
    """Build the ServerApp: FedAvg (+ DP + budget), node deadline, per-round log and JSON."""
    app = ServerApp()

    class LoggingFedAvg(FedAvg):
        """FedAvg that records replies, failures and bytes of every training round."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.rounds: list[dict[str, Any]] = []
            self.sent_bytes = 0
            self.sampled: set[int] = set()

        def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.sent_bytes = sum(arrays.count_bytes() for _ in messages)
            self.sampled = {m.metadata.dst_node_id for m in messages}
            return messages

        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            replies = list(replies)
            ok = [r for r in replies if not r.has_error()]
            failed = [r for r in replies if r.has_error()]
            for reply in failed:
                LOGGER.warning(
                    "round %d: node %s dropped out (%s); aggregating the other %d",
                    server_round,
                    reply.metadata.src_node_id,
                    reply.error.reason.strip().splitlines()[-1][:200],
                    len(ok),
                )
            silent = sorted(self.sampled - {r.metadata.src_node_id for r in replies})
            if silent:
                LOGGER.warning(
                    "round %d: node(s) %s sent no reply within round-timeout; aggregating the "
                    "other %d",
                    server_round,
                    silent,
                    len(ok),
                )
            received = sum(r.content["arrays"].count_bytes() for r in ok)
            self.rounds.append(
                {
                    "round": server_round,
                    "replies": len(ok),
                    "failed": [
                        {"node": r.metadata.src_node_id, "code": r.error.code} for r in failed
                    ],
                    "no_reply": silent,
                    "bytes_sent": self.sent_bytes,
                    "bytes_received": received,
                }
            )
            return super().aggregate_train(server_round, replies)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = merged_config(context.run_config, overrides)
        t0 = time.perf_counter()
        min_clients = int(config["min-clients"])
        guarded = NodeDeadlineGrid(grid, min_clients, float(config["node-timeout"]))
        base = LoggingFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=min_clients,
            min_available_nodes=min_clients,
        )
        strategy = privacy.wrap_strategy(base, config)
        x_test, y_test = synthetic_partition(-1, num_samples=200, seed=int(config["seed"]))

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            weights = {k: v.numpy() for k, v in arrays.items()}
            return MetricRecord({"accuracy": accuracy(weights, x_test, y_test)})

        result: dict[str, Any] = {"config": {k: config[k] for k in sorted(config)}}
        try:
            out = strategy.start(
                guarded,
                ArrayRecord({k: Array(v) for k, v in initial_weights().items()}),
                num_rounds=int(config["num-server-rounds"]),
                timeout=float(config["round-timeout"]),
                train_config=ConfigRecord({"lr": float(config["lr"])}),
                evaluate_fn=evaluate,
            )
        except NodesUnavailableError as err:
            result["error"] = str(err)
            _write(config, result | {"rounds": base.rounds})
            LOGGER.error("%s", err)
            raise
        result["rounds"] = base.rounds
        result["accuracy"] = {
            int(r): float(m["accuracy"]) for r, m in out.evaluate_metrics_serverapp.items()
        }
        result["train_metrics"] = {
            int(r): {k: float(v) for k, v in m.items()}
            for r, m in out.train_metrics_clientapp.items()
        }
        if hasattr(strategy, "accountant"):
            result["privacy"] = strategy.accountant.report()
        result["final_arrays"] = {k: v.numpy().tolist() for k, v in out.arrays.items()}
        result["wall_s"] = time.perf_counter() - t0
        _write(config, result)

    return app


def _write(config: Mapping[str, Any], result: dict[str, Any]) -> None:
    out_dir = str(config.get("out-dir", ""))
    if out_dir:
        path = Path(out_dir) / "smoke_result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


#: Components referenced by ``[tool.flwr.app.components]`` of a smoke-test app directory.
server_app = make_server_app()
client_app = make_client_app()
