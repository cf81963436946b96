"""Flower ClientApp: one hospital. Unpack the message, call the engine, pack the reply.

The client loads only its own images (see :func:`kidneyscan.federated.task.load_client_samples`)
and replies with the trainable tensors and aggregate metrics only (loss, accuracy, counts):
never image paths, ids or anything patient-related.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

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

from kidneyscan.federated import logs, task

log = logging.getLogger(__name__)

app = ClientApp()

Handler = Callable[[Message, Context], Message]


def _privacy_mods(cfg: dict[str, Any]) -> list[Any]:
    """Client mods from the privacy module (DP clipping, ...) when it exists."""
    try:
        # Owned by the privacy area; optional so both halves can be merged in any order.
        privacy: Any = importlib.import_module("kidneyscan.federated.privacy")
    except ImportError:
        return []
    return list(privacy.client_mods(cfg))


def _with_mods(handler: Handler, mods: list[Any]) -> Handler:
    # Mods depend on the run config, which is only known per message: compose them here
    # rather than at decoration time (same order as ClientApp(mods=[...])).
    wrapped = handler
    for mod in reversed(mods):

        def wrapped_fn(msg: Message, ctx: Context, _mod: Any = mod, _next: Handler = wrapped):
            return _mod(msg, ctx, _next)

        wrapped = wrapped_fn
    return wrapped


def _named(record: Any) -> dict[str, Any]:
    return {k: v.numpy() for k, v in record.items()}


def _client_id(context: Context) -> dict[str, int]:
    pid = context.node_config.get("partition-id")
    return {"partition-id": int(pid)} if pid is not None else {}


def _unit_weight(cfg: dict[str, Any]) -> dict[str, int]:
    # Under DP the strategy averages uniformly by this key (see task.UNIT_WEIGHT_KEY).
    return {task.UNIT_WEIGHT_KEY: 1} if task.uses_dp(cfg) else {}


#: Key of this site's optimiser state in its Flower ``Context.state`` (optimizer-state=keep).
OPTIMIZER_STATE_KEY = "kidneyscan-optimizer"


def kept_optimizer_state(cfg: Mapping[str, Any], context: Context) -> dict[str, Any] | None:
    """The optimiser state this site kept last round, or None (fresh, or the first round)."""
    if cfg["optimizer-state"] != "keep" or OPTIMIZER_STATE_KEY not in context.state:
        return None
    packed = context.state[OPTIMIZER_STATE_KEY]["state"]  # type: ignore[index]
    if not isinstance(packed, bytes):
        raise task.FederatedConfigError(f"{OPTIMIZER_STATE_KEY} in the node state is not bytes")
    return task.unpack_optimizer_state(packed)


def keep_optimizer_state(context: Context, stats: Mapping[str, Any]) -> None:
    """Store the state :func:`task.train_local` returned (keep only) in this node's Context:
    it stays in the node's memory; only the trainable tensors leave."""
    if "optimizer-state" in stats:
        packed = task.pack_optimizer_state(stats["optimizer-state"])
        context.state[OPTIMIZER_STATE_KEY] = ConfigRecord({"state": packed})


def _train(msg: Message, context: Context) -> Message:
    logs.from_env()
    cfg = task.run_config(context.run_config)
    config: Any = msg.content["config"]
    server_round = int(config.get("server-round", 1))
    proximal_mu = float(config.get("proximal-mu", 0.0))
    model = task.build_model(cfg)
    task.from_named(model, _named(msg.content["arrays"]))
    samples = task.load_client_samples(cfg, context.node_config)
    train, _ = task.split_local(samples, float(cfg["local-val-fraction"]), int(cfg["seed"]))
    stats = task.train_local(
        model,
        train,
        cfg,
        proximal_mu=proximal_mu,
        server_round=server_round,
        optimizer_state=kept_optimizer_state(cfg, context),
    )
    keep_optimizer_state(context, stats)
    named = task.to_named(model, fp16=bool(cfg["transport-fp16"]))
    sent = task.payload_bytes(named)
    log.info("round %d: client sends %d bytes of trainable tensors", server_round, sent)
    metrics = MetricRecord(
        {
            "train-loss": stats["loss"],
            "train-accuracy": stats["accuracy"],
            "num-examples": int(stats["num-examples"]),
            "optimizer-steps": int(stats["optimizer-steps"]),
            "bytes-sent": sent,
            **_client_id(context),
            **_unit_weight(cfg),
        }
    )
    arrays = ArrayRecord({k: Array(v) for k, v in named.items()})
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    return Message(content=content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    logs.from_env()
    cfg = task.run_config(context.run_config)
    model = task.build_model(cfg)
    task.from_named(model, _named(msg.content["arrays"]))
    samples = task.load_client_samples(cfg, context.node_config)
    train, val = task.split_local(samples, float(cfg["local-val-fraction"]), int(cfg["seed"]))
    # Without a local hold-out the global model is scored on the site's training images,
    # which still shows how well one model fits every hospital.
    logits, labels = task.evaluate_logits(model, val or train, cfg)
    scalars, _ = task.scores(logits, labels)
    metrics = MetricRecord(
        {
            "eval-loss": scalars["loss"],
            "eval-accuracy": scalars["accuracy"],
            "eval-macro-f1": scalars["macro-f1"],
            # The site's calibration curve (mean NLL per temperature), averaged by the server.
            "eval-nll-by-temperature": task.nll_by_temperature(logits, labels),
            "num-examples": int(scalars["num-examples"]),
            **_client_id(context),
            **_unit_weight(cfg),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this hospital's images; reply with its tensors."""
    cfg = task.run_config(context.run_config)
    return _with_mods(_train, _privacy_mods(cfg))(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global model on this hospital's held-out (or training) images."""
    return _evaluate(msg, context)
