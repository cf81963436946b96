"""Strategy selection from the run config, robust-aggregation start-up checks, and a recorder.

All strategies are Flower's own (``flwr.serverapp.strategy``); this module only picks one,
checks that robust aggregation can tolerate the assumed number of attackers, and wraps the
result in :class:`RecordingStrategy`, which keeps per-client metrics and byte counts and
optionally ships tensors as float16.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from kidneyscan.federated import task

log = logging.getLogger(__name__)

STRATEGIES = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
)
#: Metric keys that identify a client; reported per client, never averaged.
CLIENT_KEYS = ("partition-id",)


class StrategyError(ValueError):
    """The strategy cannot run as configured (unknown name, too few clients for robustness)."""


def check_robustness(strategy: str, num_clients: int, attackers: int, beta: float = 0.2) -> None:
    """Fail at start-up if ``num_clients`` per round cannot tolerate ``attackers`` bad clients.

    * Krum needs ``n > 2f + 2`` (Blanchard et al., 2017).
    * The coordinate-wise median needs an honest majority: ``n > 2f``.
    * The trimmed mean drops ``floor(beta * n)`` values at each end, which must be ``>= f``.
    * Plain averaging strategies tolerate no attacker: ``f`` must be 0.

    Raises
    ------
    StrategyError
        With the numbers and what to change.
    """
    n, f = int(num_clients), int(attackers)
    if f < 0:
        raise StrategyError(f"assumed-attackers must be >= 0, got {f}")
    if f == 0:
        return
    if strategy == "krum" and not n > 2 * f + 2:
        raise StrategyError(
            f"Krum with {f} assumed attacker(s) needs more than {2 * f + 2} clients per round "
            f"(n > 2f+2); min-clients is {n}"
        )
    if strategy == "fedmedian" and not n > 2 * f:
        raise StrategyError(
            f"FedMedian with {f} assumed attacker(s) needs more than {2 * f} clients per round "
            f"(honest majority); min-clients is {n}"
        )
    if strategy == "fedtrimmedavg" and math.floor(beta * n) < f:
        raise StrategyError(
            f"FedTrimmedAvg with beta={beta} trims {math.floor(beta * n)} of {n} clients at each "
            f"end, fewer than the {f} assumed attacker(s); raise min-clients or trimmed-beta"
        )
    if strategy in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi"):
        raise StrategyError(
            f"{strategy} is not robust to attackers ({f} assumed attacker(s)); use krum, "
            "fedmedian or fedtrimmedavg"
        )


def _metrics_aggr(records: list[RecordDict], weight_key: str) -> MetricRecord:
    # Client identifiers are reported per client by the recorder; averaging them is meaningless.
    cleaned = []
    for rec in records:
        copy = RecordDict()
        for name, mrec in rec.metric_records.items():
            copy[name] = MetricRecord({k: v for k, v in mrec.items() if k not in CLIENT_KEYS})
        cleaned.append(copy)
    return aggregate_metricrecords(cleaned, weight_key)


def build_strategy(cfg: Mapping[str, Any]) -> Strategy:
    """Flower strategy named by ``cfg["strategy"]``, after the robustness check.

    Keys used: ``strategy``, ``fraction-train``, ``fraction-evaluate``, ``min-clients``,
    ``assumed-attackers``, ``proximal-mu`` (FedProx), ``server-lr`` / ``server-tau`` (FedAdam,
    FedYogi), ``server-momentum`` / ``fedavgm-server-lr`` (FedAvgM), ``trimmed-beta``
    (FedTrimmedAvg).

    Raises
    ------
    StrategyError
        Unknown strategy or too few clients for the assumed attackers.
    """
    name = str(cfg["strategy"]).lower()
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    min_clients = int(cfg["min-clients"])
    attackers = int(cfg.get("assumed-attackers", 0))
    beta = float(cfg.get("trimmed-beta", 0.2))
    check_robustness(name, min_clients, attackers, beta)
    common: dict[str, Any] = {
        "fraction_train": float(cfg["fraction-train"]),
        "fraction_evaluate": float(cfg["fraction-evaluate"]),
        "min_train_nodes": min_clients,
        "min_evaluate_nodes": min_clients if float(cfg["fraction-evaluate"]) > 0 else 0,
        "min_available_nodes": min_clients,
        "train_metrics_aggr_fn": _metrics_aggr,
        "evaluate_metrics_aggr_fn": _metrics_aggr,
    }
    if task.uses_dp(cfg):
        common["weighted_by_key"] = task.UNIT_WEIGHT_KEY
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedavgm":
        return FedAvgM(
            **common,
            server_learning_rate=float(cfg["fedavgm-server-lr"]),
            server_momentum=float(cfg["server-momentum"]),
        )
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(cfg["proximal-mu"]))
    if name == "fedadam":
        return FedAdam(**common, eta=float(cfg["server-lr"]), tau=float(cfg["server-tau"]))
    if name == "fedyogi":
        return FedYogi(**common, eta=float(cfg["server-lr"]), tau=float(cfg["server-tau"]))
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=beta)
    return Krum(**common, num_malicious_nodes=attackers)


def _nbytes(record: Any) -> int:
    """Raw tensor bytes in an ArrayRecord (the payload, without message framing)."""
    return int(sum(int(a.numpy().nbytes) for a in record.values()))


def _cast_record(record: ArrayRecord, dtype: Any) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=dtype)) for k, v in record.items()})


class RecordingStrategy(Strategy):
    """Delegate to ``inner`` while recording per-client metrics and bytes per round.

    With ``fp16=True`` the global tensors are sent to clients as float16 and the clients'
    float16 replies are widened to float32 before the inner strategy aggregates them, so
    averaging and server optimisers run in full precision.

    Attributes
    ----------
    rounds : dict[int, dict]
        Per round: ``train`` and ``evaluate`` lists of per-client dicts (``node-id``, the
        client's metrics and, for training, ``bytes-up``), ``bytes-down-train`` /
        ``bytes-down-evaluate`` per node, and ``failures`` (errors, lost nodes, skipped rounds).
    """

    def __init__(self, inner: Strategy, *, fp16: bool = False, round_offset: int = 0) -> None:
        self.inner = inner
        self.fp16 = fp16
        self.round_offset = round_offset
        self.rounds: dict[int, dict[str, Any]] = {}

    def _round(self, server_round: int) -> dict[str, Any]:
        r = server_round + self.round_offset
        return self.rounds.setdefault(
            r,
            {
                "train": [],
                "evaluate": [],
                "bytes-down-train": {},
                "bytes-down-evaluate": {},
                "failures": [],
            },
        )

    def _outgoing(
        self, server_round: int, messages: Iterable[Message], phase: str
    ) -> list[Message]:
        out = list(messages)
        cache: dict[int, ArrayRecord] = {}
        rec = self._round(server_round)
        for msg in out:
            for key, arrays in list(msg.content.array_records.items()):
                if self.fp16:
                    if id(arrays) not in cache:
                        cache[id(arrays)] = _cast_record(arrays, np.float16)
                    msg.content[key] = cache[id(arrays)]
                rec[f"bytes-down-{phase}"][str(msg.metadata.dst_node_id)] = _nbytes(
                    msg.content[key]
                )
        return out

    def _incoming(self, server_round: int, replies: Iterable[Message], phase: str) -> list[Message]:
        replies = list(replies)
        rec = self._round(server_round)
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                reason = msg.error.reason
                rec["failures"].append({"phase": phase, "node-id": node, "reason": reason})
                log.warning("round %d %s: node %d failed: %s", server_round, phase, node, reason)
                continue
            row: dict[str, Any] = {"node-id": node}
            for mrec in msg.content.metric_records.values():
                row.update({k: v for k, v in mrec.items()})
            if phase == "train":
                row["bytes-up"] = sum(_nbytes(arr) for arr in msg.content.array_records.values())
                if self.fp16:
                    for key, arrays in list(msg.content.array_records.items()):
                        msg.content[key] = _cast_record(arrays, np.float32)
            rec[phase].append(row)
        return replies

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Inner strategy's messages, cast to fp16 if asked; bytes recorded."""
        return self._outgoing(
            server_round, self.inner.configure_train(server_round, arrays, config, grid), "train"
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record per-client train metrics, then let the inner strategy aggregate."""
        replies = self._incoming(server_round, replies, "train")
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            self._round(server_round)["failures"].append(
                {"phase": "train", "reason": "no aggregate this round (kept previous model)"}
            )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Inner strategy's evaluate messages (fp16 if asked)."""
        return self._outgoing(
            server_round,
            self.inner.configure_evaluate(server_round, arrays, config, grid),
            "evaluate",
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record per-client evaluation metrics, then aggregate with the inner strategy."""
        return self.inner.aggregate_evaluate(
            server_round, self._incoming(server_round, replies, "evaluate")
        )

    def summary(self) -> None:
        """Inner strategy's summary."""
        self.inner.summary()
