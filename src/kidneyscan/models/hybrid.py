"""Hybrid ConvNeXt + Transformer classifier.

::

    image (B, C, S, S)
      -> timm CNN backbone (default convnext_tiny), forward_features      (B, F, h, w)
      -> flatten the last-stage feature map into h*w spatial tokens        (B, h*w, F)
      -> LayerNorm + Linear projection to embed_dim                        (B, N, D)
      -> + learned position embeddings (grid from image_size, bicubic
           interpolation when the runtime grid differs)
      -> dropout -> depth x pre-norm Transformer blocks (timm ``Block``: 8-head self-attention,
           GELU MLP, residual connections around LayerNorm'd sub-layers)
      -> final LayerNorm -> mean over tokens (global average pooling)      (B, D)
      -> dropout -> Linear head                                           (B, num_classes)

At 224 px a ConvNeXt gives a 7 x 7 grid (49 tokens); at 64 px a 2 x 2 grid (4 tokens). The
encoder always attends over these spatial tokens, never over one pooled vector.

Every trainable part is made of ``nn.Linear``, ``nn.LayerNorm``, ``nn.Conv2d`` and plain
parameters (no BatchNorm), so Opacus can compute per-sample gradients (ConvNeXt uses LayerNorm).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from kidneyscan.models.weights import create_backbone, freeze_backbone, param_counts

log = logging.getLogger(__name__)


class PositionEmbedding(nn.Module):
    """Learned position embeddings for a ``grid`` of tokens, added to the token sequence.

    A module of its own (not a bare parameter of the model) so Opacus computes its
    per-sample gradients on this small module alone.
    """

    def __init__(self, grid: tuple[int, int], embed_dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.weight = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grid ``(B, h, w, D)`` plus the embeddings, resampled when ``(h, w)`` differs."""
        _, h, w, d = tokens.shape
        gh, gw = self.grid
        pe = self.weight.reshape(1, gh, gw, d)
        if (h, w) != (gh, gw):
            # Inputs of another size than image_size: bicubic resampling of the learned grid.
            pe = F.interpolate(pe.permute(0, 3, 1, 2), size=(h, w), mode="bicubic")
            pe = pe.permute(0, 2, 3, 1)
        return tokens + pe


class HybridConvNeXtViT(nn.Module):
    """ConvNeXt feature map -> spatial tokens -> Transformer encoder -> linear head.

    Parameters
    ----------
    num_classes
        Number of output logits.
    backbone
        timm CNN name whose ``forward_features`` returns an NCHW map (``convnext_*``,
        ``tf_efficientnet_lite0``, ``resnet*``...). ``convnext_atto`` keeps tests fast.
    image_size
        Training input side; sizes the position-embedding grid.
    embed_dim
        Token width after the projection.
    depth
        Number of Transformer encoder blocks.
    num_heads
        Attention heads (must divide ``embed_dim``).
    mlp_ratio
        Hidden width of the encoder MLP relative to ``embed_dim``.
    dropout
        Dropout after the position embeddings, inside the encoder and before the head.
    freeze_fraction
        Fraction of the backbone's blocks frozen, earliest first (see
        :func:`kidneyscan.models.weights.backbone_units`).
    in_chans
        Input channels (1 or 3).
    pretrained
        Load the backbone's ImageNet weights with timm's hub loading; offline this warns and
        keeps the random initialisation.
    weights
        Local weight file for the backbone (or ``"efficientnet-lite0"``, see
        :func:`kidneyscan.models.weights.load_weights`).
    """

    backbone: Any  # a timm model; typed loosely for its forward_features / stages

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str = "convnext_tiny",
        image_size: int = 224,
        embed_dim: int = 768,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        freeze_fraction: float = 0.8,
        in_chans: int = 3,
        pretrained: bool = False,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.num_classes = num_classes
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.backbone_name = backbone

        # num_classes=0 + global_pool="" leaves forward_features' spatial map untouched.
        self.backbone = create_backbone(
            backbone, in_chans=in_chans, pretrained=pretrained, weights=weights
        )
        feat_chs, grid = self._probe_backbone(in_chans, image_size)
        self.grid_size = grid
        self.num_features = embed_dim  # what forward_head(pre_logits=True) returns

        self.token_norm = nn.LayerNorm(feat_chs)
        self.proj = nn.Linear(feat_chs, embed_dim)
        self.pos_embed = PositionEmbedding(grid, embed_dim)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                proj_drop=dropout,
                attn_drop=dropout,
                norm_layer=nn.LayerNorm,
                act_layer=nn.GELU,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        for m in [self.proj, self.head, *self.blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.freeze_fraction = freeze_fraction
        freeze_backbone(self.backbone, freeze_fraction)
        counts = param_counts(self)
        log.info(
            "hybrid(%s, %d px, %d tokens): %s of %s parameters trainable",
            backbone,
            image_size,
            grid[0] * grid[1],
            f"{counts['trainable']:,}",
            f"{counts['total']:,}",
        )

    def _probe_backbone(self, in_chans: int, image_size: int) -> tuple[int, tuple[int, int]]:
        # One tiny forward gives the exact grid (padding rules differ between CNN families).
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                out = self.backbone.forward_features(
                    torch.zeros(1, in_chans, image_size, image_size)
                )
        except (AssertionError, RuntimeError, ValueError) as exc:
            raise ValueError(
                f"backbone {self.backbone_name!r} cannot run at {image_size} px ({exc}); the "
                "hybrid needs a CNN with an NCHW feature map (e.g. convnext_tiny)"
            ) from exc
        finally:
            self.backbone.train(was_training)
        if out.ndim != 4:
            raise ValueError(
                f"backbone {self.backbone_name!r} returns features of shape {tuple(out.shape)}; "
                "the hybrid needs a CNN with an NCHW feature map (e.g. convnext_tiny)"
            )
        return int(out.shape[1]), (int(out.shape[2]), int(out.shape[3]))

    # ----------------------------------------------------------------- building blocks
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage backbone feature map ``(B, F, h, w)``."""
        out: torch.Tensor = self.backbone.forward_features(x)
        return out

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial tokens fed to the encoder: ``(B, h*w, embed_dim)`` incl. position embeddings."""
        fmap = self.feature_map(x)
        t = self.proj(self.token_norm(fmap.permute(0, 2, 3, 1)))  # (B, h, w, D)
        t = self.pos_embed(t).flatten(1, 2)  # (B, h*w, D), row-major over the grid
        return self.pos_drop(t)

    # ----------------------------------------------------------------- timm-style API
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded tokens after the final LayerNorm: ``(B, N, embed_dim)``."""
        t = self.tokens(x)
        for blk in self.blocks:
            t = blk(t)
        out: torch.Tensor = self.norm(t)
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool tokens; ``pre_logits=True`` returns the ``(B, embed_dim)`` embedding."""
        x = x.mean(dim=1)
        if pre_logits:
            return x
        out: torch.Tensor = self.head(self.head_drop(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for a normalised ``(B, C, S, S)`` batch."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm convention)."""
        return self.head

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Self-attention weights of every encoder block.

        Parameters
        ----------
        x
            Normalised input batch ``(B, C, S, S)``.

        Returns
        -------
        list of torch.Tensor
            One ``(B, num_heads, N, N)`` tensor per block; each row sums to 1 (softmax over
            the N spatial tokens attended to). Dropout is not applied.
        """
        maps: list[torch.Tensor] = []
        t = self.tokens(x)
        blk: Any
        for blk in self.blocks:
            attn = blk.attn
            b, n, c = t.shape
            y = blk.norm1(t)
            qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            t = blk(t)
        return maps
