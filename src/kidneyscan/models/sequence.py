"""A CNN backbone as the ordered list of modules its ``forward_features`` runs.

Three things need the backbone cut into pieces in forward order: freezing (the first 80 % of
the blocks), the hybrid's token stage (tokens from an earlier stage than the last) and the
frozen prefix whose output is cached (:class:`kidneyscan.models.frozen.FrozenSplit`). One list,
built here, serves all three, so "block 41 of 51" means the same module everywhere.

Supported: timm's ``ConvNeXt`` (stem, then each stage's downsample and blocks, ``norm_pre``),
``ResNet`` (``conv1``, ``bn1``, ``act1``, ``maxpool``, then every block of ``layer1`` ..
``layer4``) and ``EfficientNet`` (``conv_stem``, ``bn1``, every block of the 7 stages,
``conv_head``, ``bn2``), which covers ``convnext_*``, ``resnet*``, ``ct_resnet152`` and
``tf_efficientnet_lite0``. Running the modules in order equals ``forward_features`` (checked
by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Piece:
    """One module of the forward path.

    Attributes
    ----------
    name
        Dotted name inside the backbone (``layer3.28``, ``stages.2.blocks.0``).
    module
        The module.
    stage
        0-based stage it belongs to; -1 for the stem.
    unit
        Name of the freezing unit it counts towards (``stem``, a block name; a ConvNeXt
        downsample belongs to its stage's first block).
    """

    name: str
    module: nn.Module
    stage: int
    unit: str


_TRAILING = ("norm_pre", "conv_head", "bn2")


def supports(backbone: nn.Module) -> bool:
    """Whether :func:`backbone_sequence` knows this backbone's forward path."""
    return type(backbone).__name__ in ("ConvNeXt", "ResNet", "EfficientNet")


def backbone_sequence(backbone: nn.Module) -> list[Piece]:
    """The backbone's ``forward_features`` as an ordered list of :class:`Piece`.

    Raises
    ------
    ValueError
        The architecture is not supported (see the module docstring) or uses gradient
        checkpointing (whose forward differs).
    """
    bb: Any = backbone
    kind = type(backbone).__name__
    if getattr(bb, "grad_checkpointing", False):
        raise ValueError("backbones with gradient checkpointing have another forward path")
    pieces: list[Piece] = []
    if kind == "ConvNeXt":
        pieces.append(Piece("stem", bb.stem, -1, "stem"))
        for si, stage in enumerate(bb.stages):
            first = f"stages.{si}.blocks.0"
            pieces.append(Piece(f"stages.{si}.downsample", stage.downsample, si, first))
            for bi, block in enumerate(stage.blocks):
                name = f"stages.{si}.blocks.{bi}"
                pieces.append(Piece(name, block, si, name))
        pieces.append(Piece("norm_pre", bb.norm_pre, len(bb.stages) - 1, "norm_pre"))
        return pieces
    if kind == "ResNet":
        for name in ("conv1", "bn1", "act1", "maxpool"):
            pieces.append(Piece(name, getattr(bb, name), -1, "stem"))
        for si in range(4):
            layer = getattr(bb, f"layer{si + 1}")
            for bi, block in enumerate(layer):
                name = f"layer{si + 1}.{bi}"
                pieces.append(Piece(name, block, si, name))
        return pieces
    if kind == "EfficientNet":
        pieces += [Piece(n, getattr(bb, n), -1, "stem") for n in ("conv_stem", "bn1")]
        for si, stage in enumerate(bb.blocks):
            for bi, block in enumerate(stage):
                name = f"blocks.{si}.{bi}"
                pieces.append(Piece(name, block, si, name))
        last = len(bb.blocks) - 1
        pieces += [Piece(n, getattr(bb, n), last, "head") for n in ("conv_head", "bn2")]
        return pieces
    raise ValueError(
        f"no module sequence known for {kind} (supported: timm ConvNeXt, ResNet and "
        "EfficientNet backbones)"
    )


def num_stages(pieces: list[Piece]) -> int:
    """Number of stages (4 for ResNet and ConvNeXt, 7 for EfficientNet)."""
    return max(p.stage for p in pieces) + 1


def upto_stage(pieces: list[Piece], stage: int | None) -> list[Piece]:
    """The pieces up to and including ``stage`` (``None`` or -1: all of them)."""
    if stage is None or stage == -1:
        return list(pieces)
    n = num_stages(pieces)
    if not 0 <= stage < n:
        raise ValueError(f"token stage must be in 0..{n - 1} (or -1 for the last), got {stage}")
    if stage == n - 1:
        return list(pieces)
    # Trailing layers (ConvNeXt's norm_pre, EfficientNet's head conv) belong to the last stage.
    return [p for p in pieces if p.stage <= stage and p.name not in _TRAILING]


def run(pieces: list[Piece], x: torch.Tensor) -> torch.Tensor:
    """Apply the pieces in order."""
    for p in pieces:
        x = p.module(x)
    return x
