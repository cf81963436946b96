"""Faster CPU training of a partly frozen hybrid: run the frozen stages without autograd, and
optionally cache their output once per image.

With ``freeze_fraction=0.8`` most of the hybrid's ConvNeXt backbone is frozen. A naive loop
still runs those stages in training mode on every batch of every epoch. :class:`FrozenSplit`
cuts the model into

* ``prefix``: the leading backbone modules whose parameters are all frozen, run under
  ``torch.no_grad()`` in eval mode (no autograd graph, no saved activations, no drop-path); and
* ``rest``: the remaining (trainable) backbone blocks + the Transformer encoder + the head,

with ``rest(prefix(x)) == model(x)`` (checked by the tests). :class:`FeatureCache` goes one step
further for clients that train several local epochs without pixel augmentation: the prefix
output of every image is computed once and reused by every later epoch (and round, while the
frozen weights do not change), with optional feature-space augmentation (horizontal flip of
the feature map, which commutes with the convolutional prefix up to padding effects, and small
Gaussian noise).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kidneyscan.engine import proximal_pairs, training_objective

log = logging.getLogger(__name__)


def _convnext_sequence(backbone: Any) -> list[nn.Module]:
    """The ConvNeXt forward_features path as a flat list of modules (stem, blocks, norm)."""
    mods: list[nn.Module] = [backbone.stem]
    for stage in backbone.stages:
        mods.append(stage.downsample)
        mods.extend(stage.blocks)
    mods.append(backbone.norm_pre)
    return mods


class FrozenSplit(nn.Module):
    """A hybrid model cut after its last leading frozen backbone module.

    Parameters
    ----------
    model
        :class:`~kidneyscan.models.hybrid.HybridConvNeXtViT` with a ConvNeXt backbone.

    Raises
    ------
    ValueError
        For another architecture, or a model with no frozen leading module.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        backbone: Any = getattr(model, "backbone", None)
        if type(model).__name__ != "HybridConvNeXtViT" or type(backbone).__name__ != "ConvNeXt":
            raise ValueError(
                f"FrozenSplit supports the hybrid with a ConvNeXt backbone, not "
                f"{type(model).__name__}/{type(backbone).__name__}"
            )
        if getattr(backbone, "grad_checkpointing", False):
            raise ValueError("FrozenSplit does not support gradient checkpointing")
        seq = _convnext_sequence(backbone)
        n = 0
        while n < len(seq) and not any(p.requires_grad for p in seq[n].parameters()):
            n += 1
        if n == 0:
            raise ValueError("the model has no frozen leading backbone module (freeze_fraction=0?)")
        self.model = model
        self.prefix = nn.Sequential(*seq[:n])
        self.suffix = nn.Sequential(*seq[n:])
        self.n_frozen_modules = n
        self.n_modules = len(seq)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen-prefix output, computed without autograd in eval mode."""
        was = self.prefix.training
        self.prefix.eval()
        try:
            with torch.no_grad():
                out: torch.Tensor = self.prefix(x)
        finally:
            self.prefix.train(was)
        return out

    def rest(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits from frozen-prefix features: trainable backbone part, encoder, head."""
        fmap = self.suffix(feats)
        m: Any = self.model
        # Run the hybrid's own forward with its feature map supplied, so that whatever it does
        # after the backbone (tokens, position embeddings, encoder, head) stays in one place.
        m.feature_map = lambda _x: fmap
        try:
            out: torch.Tensor = m(feats)
        finally:
            del m.feature_map
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, with the frozen prefix run without autograd."""
        return self.rest(self.features(x))


def feature_augment(
    feats: torch.Tensor, *, flip_p: float = 0.5, noise_std: float = 0.0, generator: Any = None
) -> torch.Tensor:
    """Cheap augmentation in feature space: per-sample horizontal flip and Gaussian noise.

    ``noise_std`` is relative to each sample's feature standard deviation.
    """
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    out = feats
    if flip_p > 0:
        flip = torch.rand(len(feats), generator=generator) < flip_p
        if flip.any():
            out = out.clone()
            out[flip] = out[flip].flip(-1)
    if noise_std > 0:
        scale = out.flatten(1).std(dim=1).view(-1, *([1] * (out.dim() - 1)))
        out = out + noise_std * scale * torch.randn(out.shape, generator=generator)
    return out


class FeatureCache:
    """Frozen-prefix features of a fixed image set, computed once.

    Parameters
    ----------
    split
        The model's :class:`FrozenSplit`.
    batches
        ``(x, y)`` batches of *un-augmented* images (augmenting pixels would make every epoch
        see other inputs, which a cache cannot serve).
    dtype
        Storage type; ``torch.bfloat16`` halves the memory at a small precision cost.
    """

    def __init__(
        self,
        split: FrozenSplit,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        feats, labels = [], []
        for x, y in batches:
            feats.append(split.features(x).to(dtype))
            labels.append(torch.as_tensor(y))
        if not feats:
            raise ValueError("FeatureCache got no batches")
        self.features = torch.cat(feats)
        self.labels = torch.cat(labels).long()
        self.weights_fingerprint = _fingerprint(split.prefix)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached features."""
        return self.features.numel() * self.features.element_size()

    def is_valid_for(self, split: FrozenSplit) -> bool:
        """False when the frozen weights changed since caching (e.g. a new global model)."""
        return _fingerprint(split.prefix) == self.weights_fingerprint

    def batches(
        self, batch_size: int, *, shuffle: bool = True, seed: int = 0
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(features, labels)`` batches in float32."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else None
        idx = torch.as_tensor(order) if order is not None else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            j = idx[i : i + batch_size]
            yield self.features[j].float(), self.labels[j]


def _fingerprint(module: nn.Module) -> tuple[float, ...]:
    # Sum and abs-sum of each frozen tensor: any update of the frozen weights changes it.
    with torch.no_grad():
        return tuple(v for p in module.parameters() for v in (float(p.sum()), float(p.abs().sum())))


def train_epoch_cached(
    split: FrozenSplit,
    cache: FeatureCache,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    batch_size: int = 16,
    seed: int = 0,
    flip_p: float = 0.5,
    noise_std: float = 0.0,
    bf16: bool = False,
    proximal_mu: float = 0.0,
    global_params: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """One epoch over cached features (trainable part only).

    Parameters
    ----------
    proximal_mu, global_params
        FedProx, as in :func:`kidneyscan.engine.train_one_epoch`: adds
        ``mu / 2 * sum ||w - w_global||^2`` over the trainable parameters; ``global_params``
        lists every parameter of ``split.model`` (frozen ones included) in order.

    Returns
    -------
    dict
        ``loss`` (mean), ``accuracy`` and ``n``, like :func:`kidneyscan.engine.train_one_epoch`.
    """
    if not cache.is_valid_for(split):
        raise ValueError("the frozen weights changed since the features were cached; rebuild it")
    prox_pairs = proximal_pairs(split.model, proximal_mu, global_params)
    split.model.train()
    gen = torch.Generator().manual_seed(seed)
    total, correct, n = 0.0, 0, 0
    for feats, y in cache.batches(batch_size, seed=seed):
        feats = feature_augment(feats, flip_p=flip_p, noise_std=noise_std, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        ctx: Any = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else _null()
        with ctx:
            logits = split.rest(feats)
        loss = loss_fn(logits.float(), y)
        training_objective(loss, prox_pairs, proximal_mu).backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        n += len(y)
    return {"loss": total / n, "accuracy": correct / n, "n": float(n)}


def _null() -> Any:
    from contextlib import nullcontext

    return nullcontext()
