"""In-memory cache of frozen-prefix features for federated clients, and an epoch over it.

:class:`~kidneyscan.models.frozen.FrozenSplit` cuts a partly frozen hybrid into a frozen prefix
and a trainable tail. :class:`FeatureCache` computes the prefix output of every image of a
client's partition once and reuses it in every later epoch (and round, while the frozen weights
do not change), with optional feature-space augmentation (horizontal flip of the feature map,
which commutes with the convolutional prefix up to padding effects, and small Gaussian noise).
Central training caches on disk instead (:mod:`kidneyscan.features`). The epoch itself is
:func:`kidneyscan.engine.train_one_epoch` on the split's tail: one epoch loop in the project.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn

from kidneyscan.engine import train_one_epoch
from kidneyscan.models.frozen import FrozenSplit, feature_augment

__all__ = [
    "FeatureCache",
    "FrozenSplit",
    "feature_augment",
    "train_epoch_cached",
]

log = logging.getLogger(__name__)


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
    """One epoch over cached features (trainable part only), run by the engine's epoch loop.

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
    gen = torch.Generator().manual_seed(seed)
    # Augmented lazily, batch by batch, so the generator is drawn in the same order as the
    # cache's shuffled batches come.
    batches = (
        (feature_augment(feats, flip_p=flip_p, noise_std=noise_std, generator=gen), y)
        for feats, y in cache.batches(batch_size, seed=seed)
    )
    # The tail shares (and lists, in order) every parameter of split.model, so the FedProx
    # pairs and train() mode are those of the whole model; the cached features keep their
    # layout (channels_last=False) as they always did.
    return train_one_epoch(
        split.tail,
        batches,
        optimizer,
        loss_fn=loss_fn,
        proximal_mu=proximal_mu,
        global_params=global_params,
        bf16=bf16,
        channels_last=False,
    )
