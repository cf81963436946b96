"""The training recipe's loss and optimiser: class weights, smoothed cross-entropy, AdamW.

Apart from :mod:`kidneyscan.engine` because building the objective is one job and running
the epoch loops another; the engine re-exports every name here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kidneyscan.config import TrainConfig


def class_weights(class_counts: Sequence[int] | np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights ``n / (k * count)``; absent classes get weight 0.

    Absent classes happen on federated clients with non-IID data; weight 0 keeps the loss
    finite and such a class simply contributes nothing locally.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"class_counts must be a 1-D sequence of >= 2 counts, got {counts}")
    if (counts < 0).any():
        raise ValueError(f"class_counts must be >= 0, got {counts.tolist()}")
    present = counts > 0
    if not present.any():
        raise ValueError("class_counts are all zero")
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32)


def make_loss(cfg: TrainConfig, class_counts: Sequence[int] | np.ndarray) -> nn.Module:
    """Label-smoothed cross-entropy, class-weighted when ``cfg.class_weighting == "loss"``.

    Parameters
    ----------
    cfg
        Training recipe (``label_smoothing``, ``class_weighting``).
    class_counts
        Training samples per class (length = number of classes).
    """
    weight = class_weights(class_counts) if cfg.class_weighting == "loss" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases, norm scales, position embeddings and tokens are not regularised (timm habit).
        if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, steps_per_epoch: int, *, start_step: int = 0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over trainable parameters with a per-step linear warm-up + cosine schedule.

    Parameters
    ----------
    model
        The model; frozen parameters (``requires_grad=False``) are left out.
    cfg
        Recipe: ``lr``, ``weight_decay``, ``warmup_epochs``, ``epochs``.
    steps_per_epoch
        Optimiser steps per epoch (batches of the training loader).
    start_step
        Where on the schedule the first step lies: a federated site trains round ``r`` of a
        run of ``cfg.epochs`` passes from step ``(r - 1) * local_epochs * steps_per_epoch``,
        so the rounds together follow the one central schedule.

    Returns
    -------
    optimizer, scheduler
        Call ``scheduler.step()`` after every ``optimizer.step()``.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)

    def factor(local_step: int) -> float:
        step = start_step + local_step
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
