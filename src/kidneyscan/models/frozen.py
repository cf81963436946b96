"""The hybrid cut at its frozen prefix: what can be computed once, and what must be trained.

With a pretrained backbone most of the hybrid is frozen (80 % of the backbone's blocks by
default, or all of it). :class:`FrozenSplit` cuts the model into

* ``prefix``: the leading backbone modules whose parameters are all frozen, run in eval mode
  without autograd (no graph, no saved activations, BatchNorm with its pretrained statistics);
* the *tail*: the remaining (trainable) backbone blocks + the Transformer encoder + the head,

with ``split.rest(split.features(x)) == model(x)`` (checked by the tests). The prefix output
of a fixed image set can then be computed once and cached
(:mod:`kidneyscan.features` on disk, :class:`kidneyscan.export.fasttrain.FeatureCache` in
memory), and :attr:`FrozenSplit.tail` trains on it through the engine's ordinary epoch loop.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn as nn
from torch.fx.experimental.optimization import fuse

log = logging.getLogger(__name__)


class FrozenSplit(nn.Module):
    """A hybrid model cut after its last leading frozen backbone module.

    Attributes
    ----------
    prefix, suffix
        The frozen leading modules, and the backbone modules after them.
    tail
        The trainable part as a model of its own (:class:`FrozenTail`).
    cut
        Name of the last frozen module (``layer3.28``): what cached features are.

    Parameters
    ----------
    model
        :class:`~kidneyscan.models.hybrid.HybridCNNTransformer` whose backbone
        :mod:`kidneyscan.models.sequence` supports (ConvNeXt, ResNet, ``ct_resnet152``).

    Raises
    ------
    ValueError
        For another architecture, or a model with no frozen leading module.
    """

    tail: FrozenTail

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        pieces = getattr(model, "backbone_pieces", None)
        if type(model).__name__ != "HybridCNNTransformer" or pieces is None:
            backbone = type(getattr(model, "backbone", None)).__name__
            raise ValueError(
                "FrozenSplit supports the hybrid with a ConvNeXt or ResNet backbone, not "
                f"{type(model).__name__}/{backbone}"
            )
        n = 0
        while n < len(pieces) and not any(p.requires_grad for p in pieces[n].module.parameters()):
            n += 1
        if n == 0:
            raise ValueError("the model has no frozen leading backbone module (freeze_fraction=0?)")
        self.model = model
        self.prefix = nn.Sequential(*(p.module for p in pieces[:n]))
        self.suffix = nn.Sequential(*(p.module for p in pieces[n:]))
        self.n_frozen_modules = n
        self.n_modules = len(pieces)
        #: Name of the last frozen module (``layer3.28``): what the cached features are.
        self.cut = pieces[n - 1].name
        # Not a submodule: the tail shares the model's tensors, a second registration would
        # list them twice in state_dict().
        object.__setattr__(self, "tail", FrozenTail(self))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen-prefix output, computed without autograd in eval mode.

        It runs an inference copy of the prefix with each BatchNorm folded into its
        convolution and channels-last memory: for the CT ResNet-152 that gives 1.19x the images
        per second of the plain prefix on a 2-core CPU (fp32, batch 8; outputs equal to 1e-5;
        ``benchmarks/prefix_speed.py``). The copy is rebuilt whenever a prefix tensor has
        changed in place.
        """
        net = self._inference_prefix()
        with torch.no_grad():
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out: torch.Tensor = net(x)
        return out.contiguous()

    def _inference_prefix(self) -> nn.Module:
        tensors = [*self.prefix.parameters(), *self.prefix.buffers()]
        stamp = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = self.__dict__.get("_fast")
        if cached is None or cached[0] != stamp:
            # A plain attribute, not a submodule: the copy must not enter state_dict().
            cached = (stamp, _inference_copy(self.prefix))
            self.__dict__["_fast"] = cached
        module: nn.Module = cached[1]
        return module

    def rest(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits from frozen-prefix features: trainable backbone part, encoder, head."""
        m: Any = self.model
        out: torch.Tensor = m.classify_map(self.suffix(feats))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, with the frozen prefix run without autograd."""
        return self.rest(self.features(x))


def _inference_copy(prefix: nn.Module) -> nn.Module:
    """An eval-mode copy of ``prefix`` with BatchNorm folded into the convolutions (where
    ``torch.fx`` can trace it) in channels-last memory."""
    net = copy.deepcopy(prefix).eval()
    try:
        net = fuse(net)
    except Exception as exc:  # noqa: BLE001 - folding is only a speed-up; fx cannot trace all
        log.debug("frozen prefix: BatchNorm not folded (%s)", exc)
    return net.to(memory_format=torch.channels_last)


class FrozenTail(nn.Module):
    """The trainable part of a :class:`FrozenSplit` as a model of its own: features -> logits.

    It shares every tensor with the full model (training it trains the model), and offers the
    timm-style API the engine uses (``forward_features``, ``forward_head``,
    ``get_classifier``), so :func:`kidneyscan.engine.fit` (SMOTE included) runs on cached
    features unchanged.
    """

    _split: FrozenSplit

    def __init__(self, split: FrozenSplit) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the split already owns the model's tensors.
        object.__setattr__(self, "_split", split)
        self.model = split.model

    def forward_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoded tokens ``(B, N, D)`` of frozen-prefix features."""
        m: Any = self.model
        out: torch.Tensor = m.encode(m.tokens_from_map(self._split.suffix(feats)))
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The hybrid's pooling and head."""
        m: Any = self.model
        out: torch.Tensor = m.forward_head(x, pre_logits=pre_logits)
        return out

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        m: Any = self.model
        head: nn.Module = m.get_classifier()
        return head

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` from frozen-prefix features."""
        return self._split.rest(feats)


def feature_augment(
    feats: torch.Tensor, *, flip_p: float = 0.5, noise_std: float = 0.0, generator: Any = None
) -> torch.Tensor:
    """Cheap augmentation in feature space: per-sample horizontal flip and Gaussian noise.

    A flipped feature map approximates the features of the flipped image (exact only for
    mirror-symmetric kernels). ``noise_std`` is relative to each sample's feature standard
    deviation.
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
