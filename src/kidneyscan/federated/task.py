"""Framework glue shared by the ClientApp and the ServerApp (no training logic of its own).

* Run configuration: defaults (mirroring ``[tool.flwr.app.config]`` in pyproject.toml) merged
  with what Flower hands the app, so ``run_simulation`` (which passes an empty run config) and
  ``flwr run`` behave the same.
* Model: built by :func:`kidneyscan.models.factory.create_classifier` after seeding, so every
  site starts from the identical frozen backbone; only the trainable tensors travel.
* Data: each client loads only its own partition (simulation) or its own folder (deployment).
* Training and evaluation call :mod:`kidneyscan.engine`; metrics come from
  :mod:`kidneyscan.evaluation.metrics`.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from kidneyscan import engine
from kidneyscan.config import ExperimentConfig, TrainConfig
from kidneyscan.data.datasets import CLASSES, Sample, scan_dataset
from kidneyscan.data.loaders import make_loader
from kidneyscan.data.partition import load_partition
from kidneyscan.evaluation.calibration import nll
from kidneyscan.experiment import build_model as build_central_model
from kidneyscan.experiment import make_preprocessor, model_kwargs
from kidneyscan.features import VIEWS, CachedFeatures, FeatureStore, cached_logits
from kidneyscan.models.factory import trainable_state_keys
from kidneyscan.models.frozen import FrozenSplit
from kidneyscan.optim import make_optimizer
from kidneyscan.preprocess.pipeline import Preprocessor

log = logging.getLogger(__name__)

#: Environment variable through which ``kidneyscan federate`` hands its run config to the apps
#: (``flwr.simulation.run_simulation`` passes an empty ``run_config``; Ray workers inherit it).
CONFIG_ENV = "KIDNEYSCAN_FED_CONFIG"

#: Defaults of every run-config key (kebab-case, as in pyproject.toml ``[tool.flwr.app.config]``).
DEFAULTS: dict[str, bool | int | float | str] = {
    "num-server-rounds": 5,
    "local-epochs": 1,
    "strategy": "fedavg",
    "partitioning": "dirichlet",
    "dirichlet-alpha": 0.5,
    "min-samples": 2,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-clients": 2,
    "num-clients": 3,
    "assumed-attackers": 0,
    "trimmed-beta": 0.2,
    "proximal-mu": 0.01,
    "server-lr": 0.01,
    "server-tau": 0.001,
    # FedAvgM (Hsu et al., 2019): SGD with momentum on the averaged update, at the server.
    "server-momentum": 0.9,
    "fedavgm-server-lr": 1.0,
    "model": "convnext_atto",
    "model-kwargs": "{}",
    "image-size": 64,
    "in-chans": 3,
    "preprocessing": "[]",
    "batch-size": 16,
    "lr": 0.001,
    # "constant": a fresh AdamW at ``lr`` every round; "cosine": the central recipe's warm-up
    # (``warmup-epochs``) and cosine decay, spread over all rounds x local epochs.
    "lr-schedule": "constant",
    "warmup-epochs": 1.0,
    # "fresh": a new AdamW every round; "keep": the site keeps its AdamW moments and step count
    # between rounds (in its Flower Context, never sent), continuing from the averaged weights.
    "optimizer-state": "fresh",
    "weight-decay": 0.05,
    "label-smoothing": 0.1,
    "augment": True,
    # Opt-in: cache the frozen backbone prefix's features once per client process (hybrid only).
    "cache-features": False,
    "local-val-fraction": 0.15,
    "transport-fp16": False,
    "seed": 0,
    "partition-file": "",
    "test-file": "",
    "test-dir": "",
    "split-file": "",
    "out-dir": "runs/federated",
    "resume": False,
    "round-timeout": 3600.0,
    "node-timeout": 300.0,
    # Differential privacy (kidneyscan.federated.privacy): "none" or a Flower DP wrapper mode.
    "dp": "none",
    "dp-noise-multiplier": 1.0,
    "dp-clipping-norm": 1.0,
    "dp-delta": 1e-5,
    "dp-epsilon-budget": 0.0,
}


#: Values of the ``lr-schedule`` key.
LR_SCHEDULES = ("constant", "cosine")
#: Values of the ``optimizer-state`` key.
OPTIMIZER_STATES = ("fresh", "keep")

#: Train/evaluate metric every client sends as 1 under differential privacy. The strategy then
#: averages by it (uniformly) instead of by ``num-examples``: the noise is calibrated to one
#: site's clipped update weighing 1/n of the mean, which a bigger site's weight would exceed.
UNIT_WEIGHT_KEY = "unit-weight"


def uses_dp(cfg: Mapping[str, Any]) -> bool:
    """Whether the run config turns differential privacy on (any ``dp`` mode but ``none``)."""
    return str(cfg.get("dp", "none")).lower() != "none"


class FederatedConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


def run_config(context_run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge defaults, the ``KIDNEYSCAN_FED_CONFIG`` overrides and Flower's run config.

    Precedence (last wins): :data:`DEFAULTS`, the JSON in ``$KIDNEYSCAN_FED_CONFIG`` (set by
    ``kidneyscan federate`` for in-process simulation), then ``context.run_config`` (filled by
    ``flwr run`` from pyproject.toml and ``--run-config``). Values are coerced to the type of
    the default.

    Raises
    ------
    FederatedConfigError
        Unknown keys or values that cannot be converted.
    """
    merged: dict[str, Any] = dict(DEFAULTS)
    env = os.environ.get(CONFIG_ENV)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if env:
        try:
            layers.append((f"${CONFIG_ENV}", json.loads(env)))
        except json.JSONDecodeError as exc:
            raise FederatedConfigError(f"${CONFIG_ENV} is not valid JSON: {exc}") from exc
    layers.append(("run config", dict(context_run_config or {})))
    for source, layer in layers:
        for key, value in layer.items():
            if key not in DEFAULTS:
                # Other areas (privacy, deployment) add their own keys; keep them untouched.
                merged[key] = value
                continue
            merged[key] = _coerce(key, value, DEFAULTS[key], source)
    _validate(merged)
    return merged


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise FederatedConfigError(
            f"{source}: {key}={value!r} is not a valid {type(default).__name__}"
        ) from None


def _validate(cfg: Mapping[str, Any]) -> None:
    positive = ("num-server-rounds", "local-epochs", "batch-size", "min-clients", "image-size")
    for key in positive:
        if cfg[key] < 1:
            raise FederatedConfigError(f"{key} must be >= 1, got {cfg[key]}")
    for key in ("fraction-train", "fraction-evaluate"):
        if not 0.0 <= cfg[key] <= 1.0:
            raise FederatedConfigError(f"{key} must be in [0, 1], got {cfg[key]}")
    if not 0.0 <= cfg["local-val-fraction"] < 0.9:
        raise FederatedConfigError(
            f"local-val-fraction must be in [0, 0.9), got {cfg['local-val-fraction']}"
        )
    if cfg["lr"] <= 0:
        raise FederatedConfigError(f"lr must be > 0, got {cfg['lr']}")
    if cfg["lr-schedule"] not in LR_SCHEDULES:
        raise FederatedConfigError(
            f"lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg['lr-schedule']!r}"
        )
    if cfg["optimizer-state"] not in OPTIMIZER_STATES:
        raise FederatedConfigError(
            f"optimizer-state must be one of {', '.join(OPTIMIZER_STATES)}, "
            f"got {cfg['optimizer-state']!r}"
        )
    if cfg["warmup-epochs"] < 0:
        raise FederatedConfigError(f"warmup-epochs must be >= 0, got {cfg['warmup-epochs']}")
    if not 0.0 <= cfg["server-momentum"] < 1.0:
        raise FederatedConfigError(
            f"server-momentum must be in [0, 1), got {cfg['server-momentum']}"
        )
    if cfg["fedavgm-server-lr"] <= 0:
        raise FederatedConfigError(f"fedavgm-server-lr must be > 0, got {cfg['fedavgm-server-lr']}")
    for key in ("model-kwargs", "preprocessing"):
        try:
            json.loads(cfg[key])
        except json.JSONDecodeError as exc:
            raise FederatedConfigError(f"{key} must be JSON, got {cfg[key]!r} ({exc})") from exc


# --------------------------------------------------------------------------- model


def experiment_config(cfg: Mapping[str, Any]) -> ExperimentConfig:
    """The run config's model and input as the central :class:`ExperimentConfig`.

    Federated and central training then build the model (starting weights, input size, freeze
    policy) and the preprocessing (steps, size, normalisation from the model's data config)
    with the same functions, so their checkpoints are interchangeable. ``weights`` and
    ``pretrained`` in ``model-kwargs`` say where the backbone starts; they are not part of the
    architecture and so not of :func:`model_spec`.
    """
    kwargs = dict(json.loads(cfg["model-kwargs"]))
    weights = kwargs.pop("weights", None)
    pretrained = bool(kwargs.pop("pretrained", False))
    try:
        return ExperimentConfig(
            model=str(cfg["model"]),
            model_kwargs=kwargs,
            image_size=int(cfg["image-size"]),
            in_chans=int(cfg["in-chans"]),
            steps=list(json.loads(cfg["preprocessing"])),
            pretrained=pretrained,
            weights=None if weights is None else str(weights),
        )
    except ValueError as exc:
        raise FederatedConfigError(f"model / preprocessing settings: {exc}") from exc


def model_spec(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``{"name", "kwargs"}`` entry stored in checkpoint metadata."""
    kwargs, _ = model_kwargs(experiment_config(cfg))
    kwargs.setdefault("in_chans", int(cfg["in-chans"]))
    return {"name": str(cfg["model"]), "kwargs": kwargs}


def build_model(cfg: Mapping[str, Any], classes: Sequence[str] = CLASSES) -> nn.Module:
    """Create the classifier from the run config, seeded so every site builds the same weights.

    The frozen part of the backbone never travels: identical initialisation (same seed, or the
    same offline weights) is what keeps it identical across sites.
    """
    torch.manual_seed(int(cfg["seed"]))
    model, _ = build_central_model(experiment_config(cfg), len(classes))
    return model


def build_preprocessor(cfg: Mapping[str, Any]) -> Preprocessor:
    """The :class:`~kidneyscan.preprocess.pipeline.Preprocessor` used by every site and server.

    The central run's (:func:`kidneyscan.experiment.make_preprocessor`): the kidney band's 3:2
    width and the model's normalisation come from the same rules, so a federated checkpoint and
    a central one built from the same config see the same input tensors.
    """
    return make_preprocessor(experiment_config(cfg))


def trainable_keys(model: nn.Module) -> list[str]:
    """Names of the state-dict entries that are trained, hence exchanged, in this order."""
    return list(trainable_state_keys(model))


def get_trainable(model: nn.Module) -> list[np.ndarray]:
    """Copies of the trainable tensors as float32 NumPy arrays, in :func:`trainable_keys` order."""
    state = model.state_dict()
    return [state[k].detach().cpu().float().numpy().copy() for k in trainable_keys(model)]


def set_trainable(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays produced by :func:`get_trainable` (possibly fp16) into ``model``.

    Raises
    ------
    ValueError
        If the number or shapes of the arrays do not match the model's trainable tensors.
    """
    keys = trainable_keys(model)
    if len(arrays) != len(keys):
        raise ValueError(f"expected {len(keys)} trainable arrays, got {len(arrays)}")
    state = model.state_dict()
    update = {}
    for key, arr in zip(keys, arrays, strict=True):
        if tuple(arr.shape) != tuple(state[key].shape):
            raise ValueError(
                f"array for {key!r} has shape {tuple(arr.shape)}, model expects "
                f"{tuple(state[key].shape)}"
            )
        update[key] = torch.as_tensor(np.asarray(arr)).to(state[key].dtype)
    model.load_state_dict(update, strict=False)


def to_named(model: nn.Module, *, fp16: bool = False) -> dict[str, np.ndarray]:
    """Trainable tensors keyed by name (what goes into an ``ArrayRecord``)."""
    arrays = get_trainable(model)
    if fp16:
        arrays = [a.astype(np.float16) for a in arrays]
    return dict(zip(trainable_keys(model), arrays, strict=True))


def from_named(model: nn.Module, named: Mapping[str, np.ndarray]) -> None:
    """Load a name -> array mapping (from an ``ArrayRecord``) into the trainable tensors.

    Raises
    ------
    ValueError
        If the names differ from the model's trainable tensors (naming what is missing/extra).
    """
    keys = trainable_keys(model)
    missing = [k for k in keys if k not in named]
    extra = [k for k in named if k not in set(keys)]
    if missing or extra:
        raise ValueError(
            f"received arrays do not match the model's trainable tensors: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    set_trainable(model, [named[k] for k in keys])


def payload_bytes(named: Mapping[str, np.ndarray]) -> int:
    """Bytes of raw tensor data in a payload (what the bytes-per-round numbers count)."""
    return int(sum(np.asarray(a).nbytes for a in named.values()))


# --------------------------------------------------------------------------- data


def load_client_samples(cfg: Mapping[str, Any], node_config: Mapping[str, Any]) -> list[Sample]:
    """The training images of THIS client only.

    Deployment: ``node_config["data-dir"]`` names the hospital's local folder (CT-KIDNEY /
    ImageFolder layout). Simulation: ``node_config["partition-id"]`` selects this client's rows
    of the partition CSV written by ``kidneyscan federate`` (``partition-file``).

    Raises
    ------
    FederatedConfigError
        If neither a data folder nor a partition file + partition id is available.
    """
    if node_config.get("data-dir"):
        return scan_dataset(str(node_config["data-dir"]))
    if "partition-id" in node_config and cfg.get("partition-file"):
        pid = int(node_config["partition-id"])
        return load_partition(str(cfg["partition-file"]), partition_id=pid)[pid]
    raise FederatedConfigError(
        "this client has no data: start the SuperNode with --node-config \"data-dir='...'\" "
        "or run the simulation through `kidneyscan federate` (which writes partition-file)"
    )


def split_local(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of a site's images (stratified when possible) for local validation."""
    samples = list(samples)
    n_val = int(round(fraction * len(samples)))
    if fraction <= 0 or n_val < 1 or len(samples) - n_val < 1:
        return samples, []
    labels = [s.label for s in samples]
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and n_val >= len(set(labels)) else None
    train, val = train_test_split(samples, test_size=n_val, random_state=seed, stratify=stratify)
    return list(train), list(val)


# --------------------------------------------------------------------------- train / evaluate


def train_local(
    model: nn.Module,
    samples: Sequence[Sample],
    cfg: Mapping[str, Any],
    *,
    proximal_mu: float = 0.0,
    server_round: int = 1,
    optimizer_state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the trainable tensors on this site's images for ``local-epochs`` epochs.

    The optimiser is :func:`local_optimizer`'s: a fresh AdamW each round, or, with
    ``optimizer-state = "keep"``, one that continues from ``optimizer_state`` (the moments
    this site's previous round returned; they never leave the site), at a constant rate or at
    this round's part of the cosine schedule.
    With ``proximal_mu > 0`` the engine adds the FedProx term towards the received weights.
    With ``cache-features`` on and a hybrid whose ConvNeXt backbone has frozen leading blocks,
    the frozen features of these images are computed once per process and reused by every
    local epoch and round (see :func:`_train_local_cached`); otherwise a warning says why not
    and training runs as usual.

    Returns
    -------
    dict
        ``loss`` and ``accuracy`` of the last local epoch, ``num-examples`` trained on,
        ``optimizer-steps`` (the AdamW step count at the end: it grows across rounds only when
        the state is kept) and, with ``optimizer-state = "keep"``, ``optimizer-state`` (the
        optimiser's ``state_dict`` for the next round).
    """
    if not samples:
        raise FederatedConfigError("this client has no training images")
    pre = build_preprocessor(cfg)
    # Different shuffling each round and site, reproducible for a seed.
    seed = int(cfg["seed"]) * 1000 + server_round
    split = _cache_split(model) if bool(cfg["cache-features"]) else None
    if split is not None:
        return _train_local_cached(
            split,
            samples,
            cfg,
            pre,
            seed=seed,
            proximal_mu=proximal_mu,
            server_round=server_round,
            optimizer_state=optimizer_state,
        )
    loader = make_loader(
        list(samples),
        pre,
        train=True,
        batch_size=int(cfg["batch-size"]),
        augment=bool(cfg["augment"]),
        seed=seed,
    )
    optimizer, scheduler = local_optimizer(
        model, cfg, server_round=server_round, steps_per_epoch=len(loader), state=optimizer_state
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(cfg["label-smoothing"]))
    # The engine's proximal term wants every parameter (frozen ones included), in order.
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    model.train()
    stats: dict[str, float] = {}
    for _ in range(int(cfg["local-epochs"])):
        stats = engine.train_one_epoch(
            model,
            loader,
            optimizer,
            loss_fn=loss_fn,
            scheduler=scheduler,
            proximal_mu=float(proximal_mu),
            global_params=global_params,
        )
    return _local_result(stats, len(samples), optimizer, cfg)


def _local_result(
    stats: Mapping[str, float], n: int, optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any]
) -> dict[str, Any]:
    steps = [int(st["step"]) for st in optimizer.state.values() if "step" in st]
    result: dict[str, Any] = {
        "loss": float(stats["loss"]),
        "accuracy": float(stats["accuracy"]),
        "num-examples": n,
        "optimizer-steps": max(steps, default=0),
    }
    if cfg["optimizer-state"] == "keep":
        result["optimizer-state"] = copy.deepcopy(optimizer.state_dict())
    return result


def local_optimizer(
    model: nn.Module,
    cfg: Mapping[str, Any],
    *,
    server_round: int,
    steps_per_epoch: int,
    state: Mapping[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """This round's optimiser over the trainable tensors, and its scheduler (None: constant).

    ``lr-schedule = "cosine"`` builds the central recipe's optimiser
    (:func:`kidneyscan.optim.make_optimizer`: no decay on norms and biases, linear warm-up over
    ``warmup-epochs``, cosine decay) for a run of ``num-server-rounds x local-epochs`` passes
    and starts round ``server_round`` where the previous round left the schedule: no state
    travels, only the round number. ``"constant"`` is an AdamW at ``lr``.

    ``state`` (an optimiser ``state_dict`` this site saved last round) restores the moments and
    step counts only; the rates stay this round's, so the schedule is not rewound.

    Raises
    ------
    FederatedConfigError
        ``state`` does not fit the model's trainable tensors (another model or config).
    """
    optimizer, scheduler = _new_local_optimizer(model, cfg, server_round, steps_per_epoch)
    if state is not None:
        _restore_moments(optimizer, state)
    return optimizer, scheduler


def _restore_moments(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load the per-tensor moments and step counts of ``state`` (its rates are ignored)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = state.get("state")
    problem = None
    if not isinstance(saved, Mapping):
        problem = "it has no per-tensor 'state'"
    elif not set(saved) <= set(range(len(params))):  # tensors without a gradient have none
        problem = f"it holds moments of {len(saved)} tensors, the model trains {len(params)}"
    else:
        for i, entry in saved.items():
            for key, value in entry.items():
                if key != "step" and torch.is_tensor(value) and value.shape != params[i].shape:
                    problem = f"tensor {i}: {key} {tuple(value.shape)} vs {tuple(params[i].shape)}"
                    break
            if problem:
                break
    if problem or not isinstance(saved, Mapping):
        raise FederatedConfigError(
            f"optimizer-state=keep: the kept optimiser state does not fit this model ({problem})"
        )
    # A copy: torch would otherwise step the caller's tensors in place. The param groups (and
    # so the rates) stay this round's.
    current = optimizer.state_dict()
    optimizer.load_state_dict(
        {"state": copy.deepcopy(dict(saved)), "param_groups": current["param_groups"]}
    )


def pack_optimizer_state(state: Mapping[str, Any]) -> bytes:
    """An optimiser ``state_dict`` as bytes, for the site's Flower Context (it is never sent)."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def unpack_optimizer_state(data: bytes) -> dict[str, Any]:
    """The inverse of :func:`pack_optimizer_state` (tensors and numbers only: weights_only)."""
    state: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
    return state


def _new_local_optimizer(
    model: nn.Module, cfg: Mapping[str, Any], server_round: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    if cfg["lr-schedule"] == "cosine":
        epochs = int(cfg["num-server-rounds"]) * int(cfg["local-epochs"])
        recipe = TrainConfig(
            epochs=epochs,
            lr=float(cfg["lr"]),
            weight_decay=float(cfg["weight-decay"]),
            warmup_epochs=float(cfg["warmup-epochs"]),
        )
        start = (server_round - 1) * int(cfg["local-epochs"]) * steps_per_epoch
        return make_optimizer(model, recipe, steps_per_epoch, start_step=start)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight-decay"])
    ), None


def _cache_split(model: nn.Module) -> FrozenSplit | None:
    """The model's :class:`~kidneyscan.models.frozen.FrozenSplit`, or None (with a warning)."""
    try:
        return FrozenSplit(model)
    except ValueError as exc:
        log.warning(
            "cache-features does not apply (%s): training normally, without a feature cache", exc
        )
        return None


def feature_store(split: FrozenSplit, cfg: Mapping[str, Any], pre: Preprocessor) -> FeatureStore:
    """This site's on-disk cache of the frozen prefix (the central runs' :class:`FeatureStore`).

    The flipped view is stored where training augments (it stands in for the pixel flip) or the
    model averages it at test time; the cache root is ``$KIDNEYSCAN_CACHE`` or the user's cache.
    """
    wants_flip = bool(cfg["augment"]) or bool(getattr(split.model, "flip_tta", False))
    return FeatureStore(split, pre, views=VIEWS if wants_flip else VIEWS[:1])


def _cached_features(
    split: FrozenSplit, samples: Sequence[Sample], cfg: Mapping[str, Any], pre: Preprocessor
) -> CachedFeatures:
    # FeatureStore logs (once) how many images it had to compute and where it keeps them.
    return feature_store(split, cfg, pre).load(list(samples))


def _train_local_cached(
    split: FrozenSplit,
    samples: Sequence[Sample],
    cfg: Mapping[str, Any],
    pre: Preprocessor,
    *,
    seed: int,
    proximal_mu: float,
    server_round: int,
    optimizer_state: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Local epochs on cached frozen-prefix features (same optimiser, loss and FedProx term).

    The features come from the on-disk :class:`~kidneyscan.features.FeatureStore` that central
    training uses, computed the first time a site sees an image; the epochs run the engine's
    one loop over the trainable tail, as a central cached run does. The cache holds
    deterministic pixels: with ``augment`` on, each item is drawn from its stored original or
    flipped view instead of a pixel augmentation.
    """
    feats = _cached_features(split, samples, cfg, pre)
    if cfg["augment"]:
        log.info("cache-features: pixels are not augmented; stored flipped views stand in")
    else:
        feats = CachedFeatures(feats.features[:, :1], feats.labels, feats.rois, ["orig"])
    model = split.model
    batch = int(cfg["batch-size"])
    loaders = [
        feats.loader(train=True, batch_size=batch, seed=seed * 100 + epoch)
        for epoch in range(int(cfg["local-epochs"]))
    ]
    optimizer, scheduler = local_optimizer(
        model,
        cfg,
        server_round=server_round,
        steps_per_epoch=len(loaders[0]),
        state=optimizer_state,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(cfg["label-smoothing"]))
    # The tail lists every parameter of the model in order, so the FedProx pairs line up.
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    stats: dict[str, float] = {}
    for loader in loaders:
        stats = engine.train_one_epoch(
            split.tail,
            loader,
            optimizer,
            loss_fn=loss_fn,
            scheduler=scheduler,
            proximal_mu=float(proximal_mu),
            global_params=global_params,
            channels_last=False,
        )
    return _local_result(stats, len(samples), optimizer, cfg)


def _logits(
    model: nn.Module, samples: Sequence[Sample], cfg: Mapping[str, Any], pre: Preprocessor
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of ``samples``: through the feature cache where it applies."""
    batch = max(int(cfg["batch-size"]), 32)
    split = None
    if bool(cfg["cache-features"]):
        try:
            split = FrozenSplit(model)
        except ValueError:
            split = None  # train_local has said why already
    if split is None:
        model.eval()
        return engine.predict(model, make_loader(list(samples), pre, train=False, batch_size=batch))
    feats = _cached_features(split, samples, cfg, pre)
    return cached_logits(split, feats, batch_size=batch)


#: Temperatures at which every site scores the global model on its hold-out. The server picks
#: the one with the lowest pooled NLL: temperature scaling (Guo et al., 2017) from aggregate
#: numbers only, as no site's logits leave it.
TEMPERATURES: tuple[float, ...] = tuple(float(t) for t in np.geomspace(0.2, 10.0, 49))


def nll_by_temperature(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    """Mean NLL of ``softmax(logits / T)`` at every ``T`` of :data:`TEMPERATURES`."""
    return [nll(logits, labels, t) for t in TEMPERATURES]


def pick_temperature(curve: Sequence[float]) -> float:
    """The temperature of the lowest pooled NLL in a (site-weighted) :func:`nll_by_temperature`.

    Raises
    ------
    ValueError
        If ``curve`` does not have one value per entry of :data:`TEMPERATURES`.
    """
    if len(curve) != len(TEMPERATURES):
        raise ValueError(
            f"NLL curve has {len(curve)} values, expected {len(TEMPERATURES)} (one per "
            "temperature of task.TEMPERATURES; are server and clients the same version?)"
        )
    return TEMPERATURES[int(np.nanargmin(np.asarray(curve, dtype=np.float64)))]


def evaluate_logits(
    model: nn.Module, samples: Sequence[Sample], cfg: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, C)`` and labels ``(N,)`` of ``samples`` (through the feature cache if on)."""
    return _logits(model, samples, cfg, build_preprocessor(cfg))


def scores(
    logits: np.ndarray, labels: np.ndarray, classes: Sequence[str] = CLASSES
) -> tuple[dict[str, float], np.ndarray]:
    """``loss``, ``accuracy``, ``macro-f1``, ``num-examples`` and the softmax probabilities."""
    logits_t = torch.as_tensor(logits, dtype=torch.float32)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    loss = float(nn.functional.cross_entropy(logits_t, labels_t).item())
    probs = torch.softmax(logits_t, dim=1).numpy()
    pred = probs.argmax(1)
    scalars = {
        "loss": loss,
        "accuracy": float(accuracy_score(labels, pred)),
        "macro-f1": float(
            f1_score(
                labels, pred, labels=list(range(len(classes))), average="macro", zero_division=0
            )
        ),
        "num-examples": len(labels),
    }
    return scalars, probs


def evaluate_model(
    model: nn.Module,
    samples: Sequence[Sample],
    cfg: Mapping[str, Any],
    classes: Sequence[str] = CLASSES,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Evaluate ``model`` on ``samples``.

    Returns
    -------
    scalars, probs, labels
        ``loss``, ``accuracy``, ``macro-f1``, ``num-examples``; softmax probabilities (N, C)
        at temperature 1; integer labels (N,).
    """
    logits, labels = evaluate_logits(model, samples, cfg)
    scalars, probs = scores(logits, labels, classes)
    return scalars, probs, np.asarray(labels)
