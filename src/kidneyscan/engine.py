"""Framework-free training core: one epoch, prediction, a full fit with early stopping.

Nothing here imports Flower or Flask: the federated client calls :func:`train_one_epoch` and
:func:`predict` directly, the CLI calls :func:`fit`.

Recipe: AdamW (no weight decay on biases and normalisation weights) with a linear warm-up and
a cosine decay stepped per batch, label-smoothed cross-entropy with optional inverse-frequency
class weights (or a balanced sampler), early stopping on validation macro-F1 keeping the best
weights, optional SMOTE refit of the classifier head on penultimate embeddings, optional bf16
autocast and channels-last memory format on CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Iterable, Sequence, Sized
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from imblearn.over_sampling import SMOTE
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kidneyscan.config import TrainConfig
from kidneyscan.optim import (  # re-exported: the engine is where callers look for them
    class_weights,
    make_loss,
    make_optimizer,
)

__all__ = [
    "FitResult",
    "class_weights",
    "embeddings",
    "evaluate",
    "fit",
    "make_loss",
    "make_optimizer",
    "predict",
    "proximal_pairs",
    "set_seed",
    "smote_refit_head",
    "softmax",
    "train_one_epoch",
    "training_objective",
]

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run repeats exactly on the same machine."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _autocast(bf16: bool | None, device: torch.device) -> AbstractContextManager[Any]:
    if not bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _is_channels_last(model: nn.Module) -> bool:
    for p in model.parameters():
        if p.dim() == 4:
            return bool(p.is_contiguous(memory_format=torch.channels_last)) and not bool(
                p.is_contiguous()
            )
    return False


def _prepare_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _progress(iterable: Iterable[Any], enabled: bool, desc: str, total: int | None = None) -> Any:
    if not enabled:
        return iterable
    # The outer (epoch) bar stays; inner (batch) bars vanish when done.
    return tqdm(iterable, desc=desc, total=total, leave=desc == "epochs", dynamic_ncols=True)


def proximal_pairs(
    model: nn.Module, proximal_mu: float, global_params: list[torch.Tensor] | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair each trainable parameter with its global value for the FedProx term.

    Parameters
    ----------
    model
        The local model.
    proximal_mu
        FedProx mu (0: no term, an empty list).
    global_params
        The global parameters in ``model.parameters()`` order (frozen ones included).
    """
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    if proximal_mu == 0:
        return []
    if global_params is None:
        raise ValueError("proximal_mu > 0 needs global_params")
    params = list(model.parameters())
    if len(global_params) != len(params):
        raise ValueError(f"global_params has {len(global_params)} tensors, model has {len(params)}")
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for p, g in zip(params, global_params, strict=True):
        if p.shape != g.shape:
            raise ValueError(f"global_params shape {tuple(g.shape)} != {tuple(p.shape)}")
        if p.requires_grad:
            pairs.append((p, g.detach().to(p.device, p.dtype)))
    return pairs


def training_objective(
    loss: torch.Tensor,
    prox_pairs: list[tuple[torch.Tensor, torch.Tensor]],
    proximal_mu: float,
) -> torch.Tensor:
    """Task loss plus ``mu / 2 * sum ||w - w_global||^2``; refuses a non-finite value."""
    objective = loss
    if prox_pairs:
        prox = sum(((p - g) ** 2).sum() for p, g in prox_pairs)
        objective = loss + 0.5 * proximal_mu * prox
    if not torch.isfinite(objective):
        raise FloatingPointError(
            "training loss became non-finite; lower the learning rate or check the inputs"
        )
    return objective


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: nn.Module,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    proximal_mu: float = 0.0,
    global_params: list[torch.Tensor] | None = None,
    bf16: bool = False,
    progress: bool = False,
    channels_last: bool | None = None,
    max_grad_norm: float | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` updating ``model``.

    Parameters
    ----------
    model
        Classifier returning logits.
    loader
        Yields ``(x, y)`` batches; ``y`` holds class indices ``(B,)`` or class
        distributions ``(B, K)`` (soft targets, e.g. a teacher's probabilities). Any iterable
        works: :func:`kidneyscan.export.fasttrain.train_epoch_cached` feeds cached features.
    optimizer
        Optimiser over the model's trainable parameters.
    loss_fn
        Loss on ``(logits, y)``.
    scheduler
        Stepped after every optimiser step.
    proximal_mu
        FedProx: adds ``mu / 2 * sum ||w - w_global||^2`` over trainable parameters.
    global_params
        The global model's parameters, in ``model.parameters()`` order (all of them, frozen
        ones included); required when ``proximal_mu > 0``.
    bf16
        bfloat16 autocast.
    progress
        Show a progress bar.
    channels_last
        Feed channels-last inputs; default: follow the model's memory format.
    max_grad_norm
        Clip the gradient norm (None: no clipping).

    Returns
    -------
    dict
        ``loss`` (mean task loss, without the proximal term), ``accuracy`` and ``n``.
    """
    prox_pairs = proximal_pairs(model, proximal_mu, global_params)
    device = _device_of(model)
    cl = _is_channels_last(model) if channels_last is None else channels_last
    model.train()
    total_loss, correct, n = 0.0, 0, 0
    total = len(loader) if isinstance(loader, Sized) else None
    for x, y in _progress(loader, progress, "train", total=total):
        x = _prepare_input(x, device, cl)
        y = y.to(device)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(bf16, device):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        training_objective(loss, prox_pairs, proximal_mu).backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        b = int(y.shape[0])
        total_loss += float(loss.detach()) * b
        # Soft targets (B, K) (distillation) count as their most probable class.
        hard = y.argmax(1) if y.ndim == 2 else y
        correct += int((logits.detach().argmax(1) == hard).sum())
        n += b
    if n == 0:
        raise ValueError("the training loader yielded no batches")
    return {"loss": total_loss / n, "accuracy": correct / n, "n": float(n)}


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    *,
    bf16: bool = False,
    progress: bool = False,
    channels_last: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a loader (eval mode, no gradients).

    Returns
    -------
    logits, labels
        float32 ``(N, C)`` and int64 ``(N,)`` arrays in loader order.
    """
    device = _device_of(model)
    cl = _is_channels_last(model) if channels_last is None else channels_last
    was_training = model.training
    model.eval()
    outs, labels = [], []
    try:
        for x, y in _progress(loader, progress, "predict", total=len(loader)):
            with _autocast(bf16, device):
                logits = model(_prepare_input(x, device, cl))
            outs.append(logits.float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("the loader yielded no batches")
    return torch.cat(outs).numpy().astype(np.float32), torch.cat(labels).numpy().astype(np.int64)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / temperature`` over the last axis."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int | None = None,
    bf16: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Cross-entropy loss, accuracy and macro-F1 of a model over a loader.

    Returns
    -------
    dict
        ``loss``, ``accuracy``, ``macro_f1`` and ``n``.
    """
    logits, labels = predict(model, loader, bf16=bf16, progress=progress)
    k = num_classes or logits.shape[1]
    loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    pred = logits.argmax(1)
    f1 = f1_score(labels, pred, labels=list(range(k)), average="macro", zero_division=0)
    return {
        "loss": loss,
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(f1),
        "n": float(len(labels)),
    }


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes
    ----------
    history
        One dict per epoch: ``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
        ``val_accuracy``, ``val_macro_f1``, ``lr``, ``seconds``.
    best_state
        ``state_dict`` (CPU copies) at the best validation macro-F1; already loaded into the
        model when :func:`fit` returns.
    best_epoch
        1-based epoch of ``best_state``.
    stopped_early
        Whether early stopping ended training before ``cfg.epochs``.
    best_val_macro_f1
        Validation macro-F1 of ``best_state``.
    train_seconds
        Wall time of the epochs (and SMOTE refit, if any).
    smote
        Summary of the SMOTE head refit (empty when off).
    """

    history: list[dict[str, float]]
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    stopped_early: bool
    best_val_macro_f1: float
    train_seconds: float = 0.0
    smote: dict[str, Any] = field(default_factory=dict)


def _labels_of(loader: DataLoader) -> np.ndarray:
    ds = loader.dataset
    labels = getattr(ds, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    return np.concatenate([np.asarray(y) for _, y in loader]).astype(np.int64)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: TrainConfig,
    *,
    classes: Sequence[str],
    out_dir: str | Path | None = None,
    progress: bool = True,
    smote_loader: DataLoader | None = None,
) -> FitResult:
    """Train with the full recipe and keep the weights of the best validation macro-F1.

    Parameters
    ----------
    model
        Classifier returning ``len(classes)`` logits.
    train_loader
        Training batches (augmented / balanced as the caller built it).
    val_loader
        Validation batches (no augmentation); drives early stopping and model selection.
    cfg
        Training recipe.
    classes
        Class names in label order.
    out_dir
        If given, ``history.json`` is written there after every epoch.
    progress
        Show an epoch progress bar with the latest metrics.
    smote_loader
        Un-augmented, unshuffled loader over the training split for the SMOTE refit (needed
        when ``cfg.smote``; augmenting the embeddings' source would make SMOTE interpolate
        between random views rather than between images).

    Returns
    -------
    FitResult
    """
    k = len(classes)
    if cfg.smote and smote_loader is None:
        raise ValueError("cfg.smote is on: pass smote_loader (un-augmented training loader)")
    counts = np.bincount(_labels_of(train_loader), minlength=k)
    loss_fn = make_loss(cfg, counts).to(_device_of(model))  # class weights on the model's device
    optimizer, scheduler = make_optimizer(model, cfg, len(train_loader))
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("training %d of %d parameters; class counts %s", n_train, n_all, counts.tolist())

    history: list[dict[str, float]] = []
    best_f1, best_epoch, bad_epochs = -1.0, 0, 0
    best_state = _state_copy(model)
    stopped_early = False
    t0 = time.perf_counter()
    epochs = range(1, cfg.epochs + 1)
    bar = _progress(epochs, progress, "epochs", total=cfg.epochs)
    for epoch in bar:
        te = time.perf_counter()
        tr = train_one_epoch(
            model,
            train_loader,
            optimizer,
            loss_fn=loss_fn,
            scheduler=scheduler,
            bf16=bool(cfg.bf16),
            channels_last=cfg.channels_last,
            progress=progress,
        )
        va = evaluate(model, val_loader, num_classes=k, bf16=bool(cfg.bf16))
        row = {
            "epoch": float(epoch),
            "train_loss": tr["loss"],
            "train_accuracy": tr["accuracy"],
            "val_loss": va["loss"],
            "val_accuracy": va["accuracy"],
            "val_macro_f1": va["macro_f1"],
            "lr": float(optimizer.param_groups[0]["lr"]),
            "seconds": time.perf_counter() - te,
        }
        history.append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(
                loss=f"{tr['loss']:.3f}", val_f1=f"{va['macro_f1']:.3f}", best=f"{best_f1:.3f}"
            )
        log.info(
            "epoch %d/%d train loss %.4f acc %.3f | val loss %.4f acc %.3f macro-F1 %.3f",
            epoch,
            cfg.epochs,
            tr["loss"],
            tr["accuracy"],
            va["loss"],
            va["accuracy"],
            va["macro_f1"],
        )
        if va["macro_f1"] > best_f1:
            best_f1, best_epoch, bad_epochs = va["macro_f1"], epoch, 0
            best_state = _state_copy(model)
        else:
            bad_epochs += 1
        if out is not None:
            (out / "history.json").write_text(json.dumps(history, indent=2))
        if cfg.early_stopping_patience and bad_epochs >= cfg.early_stopping_patience:
            stopped_early = epoch < cfg.epochs
            log.info("early stopping after epoch %d (best epoch %d)", epoch, best_epoch)
            break
    model.load_state_dict(best_state)
    result = FitResult(history, best_state, best_epoch, stopped_early, best_f1)
    if cfg.smote:
        assert smote_loader is not None
        result.smote = smote_refit_head(model, smote_loader, val_loader, cfg, num_classes=k)
        if result.smote.get("kept"):
            result.best_state = _state_copy(model)
            result.best_val_macro_f1 = float(result.smote["val_macro_f1_after"])
    result.train_seconds = time.perf_counter() - t0
    return result


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def embeddings(
    model: nn.Module, loader: DataLoader, *, bf16: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate-layer embeddings ``forward_head(forward_features(x), pre_logits=True)``.

    Returns
    -------
    features, labels
        float32 ``(N, D)`` and int64 ``(N,)``.
    """
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(
            f"{type(model).__name__} lacks forward_features/forward_head; SMOTE needs them"
        )
    device = _device_of(model)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            with _autocast(bf16, device):
                feat = model.forward_features(x.to(device))  # type: ignore[operator]
                f = model.forward_head(feat, pre_logits=True)  # type: ignore[operator]
            feats.append(f.float().flatten(1).cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


def _classifier_of(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        raise TypeError(
            f"{type(model).__name__}: get_classifier() must return the final layer for SMOTE"
        )
    return head


def smote_refit_head(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: TrainConfig,
    *,
    num_classes: int,
) -> dict[str, Any]:
    """Refit the classifier head on SMOTE-resampled penultimate embeddings of the training split.

    Procedure: (1) embed every training image with the trained, frozen network (no
    augmentation); (2) oversample minority classes with imbalanced-learn's SMOTE in embedding
    space until all classes match the largest; (3) train only the final layer
    (``model.get_classifier()``) on the resampled embeddings for ``cfg.smote_epochs`` epochs with
    AdamW and label smoothing, without class weights (the data is balanced now); (4) keep the
    new head only if validation macro-F1 does not drop. Validation and test data are never
    resampled or seen during (1)-(3).

    Returns
    -------
    dict
        ``n_before``, ``n_after``, ``counts_before``, ``counts_after``, ``k_neighbors``,
        ``val_macro_f1_before``, ``val_macro_f1_after``, ``kept`` (or ``skipped`` with a reason).
    """
    head = _classifier_of(model)
    x, y = embeddings(model, train_loader, bf16=bool(cfg.bf16))
    counts = np.bincount(y, minlength=num_classes)
    present = counts[counts > 0]
    info: dict[str, Any] = {"n_before": int(len(y)), "counts_before": counts.tolist()}
    if present.size < 2 or present.min() < 2:
        info["skipped"] = "SMOTE needs >= 2 classes with >= 2 samples each"
        log.warning("SMOTE skipped: %s", info["skipped"])
        return info
    k_neighbors = int(min(5, present.min() - 1))
    xr, yr = SMOTE(k_neighbors=k_neighbors, random_state=cfg.seed).fit_resample(x, y)
    info.update(
        n_after=int(len(yr)),
        counts_after=np.bincount(yr, minlength=num_classes).tolist(),
        k_neighbors=k_neighbors,
    )
    before = evaluate(model, val_loader, num_classes=num_classes, bf16=bool(cfg.bf16))["macro_f1"]
    old_head = copy.deepcopy(head.state_dict())
    device = _device_of(model)
    xt = torch.as_tensor(xr, dtype=torch.float32, device=device)
    yt = torch.as_tensor(yr, dtype=torch.int64, device=device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(cfg.seed)
    head.train()
    for _ in range(cfg.smote_epochs):
        order = torch.randperm(len(yt), generator=gen).to(device)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(head(xt[idx]), yt[idx]).backward()
            opt.step()
    after = evaluate(model, val_loader, num_classes=num_classes, bf16=bool(cfg.bf16))["macro_f1"]
    kept = after >= before
    if not kept:
        head.load_state_dict(old_head)
    info.update(val_macro_f1_before=before, val_macro_f1_after=after, kept=kept)
    log.info(
        "SMOTE head refit: val macro-F1 %.3f -> %.3f (%s)",
        before,
        after,
        "kept" if kept else "reverted",
    )
    return info
