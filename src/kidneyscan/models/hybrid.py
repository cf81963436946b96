"""Hybrid CNN + Transformer classifier: a pretrained CNN's spatial feature map as tokens.

::

    image (B, C, H, W)            (default: the kidney band, 224 x 336)
      -> CNN backbone up to its token stage (default ct_resnet152, the     (B, F, h, w)
         CT-pretrained ResNet-152, last stage; convnext_* and resnet* too)
      -> flatten the last-stage feature map into h*w spatial tokens        (B, h*w, F)
      -> LayerNorm + Linear projection to embed_dim                        (B, N, D)
      -> + learned position embeddings (grid from image_size, bicubic
           interpolation when the runtime grid differs)
      -> dropout; in training, token dropout (``token_drop``: a random subset of the
           tokens, timm ``PatchDropout``; every token at inference)
      -> depth x pre-norm Transformer blocks (timm ``Block``: 8-head self-attention,
           GELU MLP, residual connections around LayerNorm'd sub-layers)
      -> final LayerNorm -> mean over tokens (global average pooling)      (B, D)
      -> dropout -> Linear head                                           (B, num_classes)

The CT ResNet-152 gives a 7 x 11 grid (77 tokens) at 224 x 336 from its last stage and
14 x 21 from ``layer3`` (``token_stage=2``); a ConvNeXt at 224 px a 7 x 7 grid, at 64 px 2 x 2.
The encoder always attends over these spatial tokens, never over one pooled vector.

Stages after the token stage are removed (every parameter left receives a gradient). Backbone
modules whose parameters are all frozen stay in eval mode in training, so a frozen ResNet's
BatchNorm keeps its pretrained statistics. The encoder and head are made of ``nn.Linear``,
``nn.LayerNorm`` and plain parameters, so Opacus can compute per-sample gradients when the
backbone is frozen (or is a LayerNorm ConvNeXt).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchDropout
from timm.models.vision_transformer import Block

from kidneyscan.models import sequence
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


#: Options of the hybrid for any backbone, unless the backbone has its own entry below.
GENERIC_DEFAULTS: dict[str, Any] = {
    "token_stage": -1,
    "token_pool": 1,
    "token_pool_mode": "avg",
    "flip_tta": False,
    "freeze_fraction": 0.8,
    "token_drop": 0.0,
}
#: The measured recipe per backbone (docs/models.md): for the CT ResNet-152, tokens from layer3
#: (14 x 21 at 224 x 336) max-pooled 2 x 2 to 7 x 11 ranked above average pooling and above its
#: last stage's 7 x 11 grid (macro-F1 0.855 vs 0.848, stone recall 0.78 vs 0.72, on early band
#: folds that were not block-aligned and so leaked: a ranking only; the strict 5-band figure
#: of this recipe is 0.695). The fully frozen backbone trains on cached features within the
#: CPU budget.
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "ct_resnet152": {
        "token_stage": 2,
        "token_pool": 2,
        "token_pool_mode": "max",
        "flip_tta": True,
        "freeze_fraction": 1.0,
    },
}


class HybridCNNTransformer(nn.Module):
    """CNN feature map -> spatial tokens -> Transformer encoder -> linear head.

    Parameters
    ----------
    num_classes
        Number of output logits.
    backbone
        timm CNN name whose ``forward_features`` returns an NCHW map (``ct_resnet152``,
        ``convnext_*``, ``resnet*``, ``tf_efficientnet_lite0``...). ``convnext_atto`` and
        ``resnet10t`` keep tests fast.
    image_size
        Training input height (and width, unless ``image_width`` is given); sizes the
        position-embedding grid.
    image_width
        Training input width (``None``: the backbone's pretrained aspect ratio, 1.5 for
        ``ct_resnet152``, square for ImageNet CNNs).
    token_stage
        0-based backbone stage whose output becomes the tokens (-1: the last; default: the
        last, ``2`` = ``layer3`` for ``ct_resnet152``). Needs a backbone
        that :mod:`kidneyscan.models.sequence` supports (ConvNeXt, ResNet, EfficientNet)
        unless -1.
    flip_tta
        (Default: off; on for ``ct_resnet152``.) In eval mode, average the logits of the
        image and its left-right mirror (test-time augmentation; training draws either
        view). Part of the model, so evaluation, the service and the ONNX graph all do it.
    token_pool, token_pool_mode
        Pool the token-stage map ``token_pool x token_pool`` (``"avg"`` or ``"max"``, edges
        kept) before it becomes tokens: ``layer3`` of the CT ResNet (14 x 21) pooled by 2
        gives 7 x 11 tokens, the cost of the last stage's grid with an earlier stage's
        features.
    token_drop
        Fraction of the spatial tokens left out of each training sample, drawn at random
        per sample (PatchDropout, Liu et al. 2022, arXiv:2208.07220; timm's ``PatchDropout``);
        inference always sees every token. A regulariser that also cuts the encoder's
        training cost by about that fraction: the cheap way to train on all 14 x 21
        ``layer3`` tokens. Default 0.
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
        :func:`kidneyscan.models.weights.backbone_units`): 0.8 by default, 1.0 (all) for
        ``ct_resnet152``.
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
        backbone: str = "ct_resnet152",
        image_size: int = 224,
        image_width: int | None = None,
        token_stage: int | None = None,
        token_pool: int | None = None,
        token_pool_mode: str | None = None,
        flip_tta: bool | None = None,
        token_drop: float | None = None,
        embed_dim: int = 768,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        freeze_fraction: float | None = None,
        in_chans: int = 3,
        pretrained: bool = False,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        # Options left at None take the backbone's measured recipe (BACKBONE_DEFAULTS).
        given = {
            "token_stage": token_stage,
            "token_pool": token_pool,
            "token_pool_mode": token_pool_mode,
            "flip_tta": flip_tta,
            "freeze_fraction": freeze_fraction,
            "token_drop": token_drop,
        }
        opts = {**GENERIC_DEFAULTS, **BACKBONE_DEFAULTS.get(backbone, {})}
        opts.update({k: v for k, v in given.items() if v is not None})
        token_stage, token_pool = int(opts["token_stage"]), int(opts["token_pool"])
        token_pool_mode, flip_tta = str(opts["token_pool_mode"]), bool(opts["flip_tta"])
        freeze_fraction = float(opts["freeze_fraction"])
        token_drop = float(opts["token_drop"])
        #: The resolved recipe options (checkpoints store them, so a later change of the
        #: defaults cannot change how a saved model is rebuilt).
        self.options = {k: opts[k] for k in given}
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0.0 <= token_drop < 1.0:
            raise ValueError(f"token_drop must be in [0, 1), got {token_drop}")
        if image_size < 16 or (image_width is not None and image_width < 16):
            raise ValueError(f"image size must be >= 16 px, got {image_size} x {image_width}")
        self.num_classes = num_classes
        if image_width is None:
            # The pretrained input's aspect ratio (1.5 for the kidney band of ct_resnet152).
            pcfg = timm.get_pretrained_cfg(backbone) if timm.is_model(backbone) else None
            h0, w0 = pcfg.input_size[-2:] if pcfg is not None else (1, 1)
            image_width = round(image_size * w0 / h0)
        self.image_size = image_size
        self.image_width = image_width
        self.embed_dim = embed_dim
        self.backbone_name = backbone

        # num_classes=0 + global_pool="" leaves forward_features' spatial map untouched.
        self.backbone = create_backbone(
            backbone, in_chans=in_chans, pretrained=pretrained, weights=weights
        )
        if token_pool < 1 or token_pool_mode not in ("avg", "max"):
            raise ValueError(
                f"token_pool must be >= 1 and token_pool_mode 'avg' or 'max', got "
                f"{token_pool} / {token_pool_mode!r}"
            )
        self.flip_tta = flip_tta
        self.token_stage = token_stage
        self._pieces = self._cut_backbone(token_stage)
        self.token_pool: nn.Module = nn.Identity()
        if token_pool > 1:
            pool_cls = nn.AvgPool2d if token_pool_mode == "avg" else nn.MaxPool2d
            self.token_pool = pool_cls(token_pool, ceil_mode=True)
        feat_chs, grid = self._probe_backbone(in_chans, (image_size, self.image_width))
        self.grid_size = grid
        self.num_features = embed_dim  # what forward_head(pre_logits=True) returns

        self.token_norm = nn.LayerNorm(feat_chs)
        self.proj = nn.Linear(feat_chs, embed_dim)
        self.pos_embed = PositionEmbedding(grid, embed_dim)
        self.pos_drop = nn.Dropout(dropout)
        self.token_drop: nn.Module = nn.Identity()
        if token_drop > 0:
            # No prefix (class) token to spare; ordered keeps the kept tokens in grid order.
            self.token_drop = PatchDropout(token_drop, num_prefix_tokens=0, ordered=True)
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
            "hybrid(%s, %d x %d px, %d tokens): %s of %s parameters trainable",
            backbone,
            image_size,
            self.image_width,
            grid[0] * grid[1],
            f"{counts['trainable']:,}",
            f"{counts['total']:,}",
        )

    def _cut_backbone(self, token_stage: int) -> list[sequence.Piece] | None:
        """The backbone's pieces up to the token stage; later stages are removed."""
        if not sequence.supports(self.backbone):
            if token_stage != -1:
                raise ValueError(
                    f"token_stage={token_stage} needs a ConvNeXt or ResNet backbone, not "
                    f"{self.backbone_name!r}"
                )
            return None
        pieces = sequence.backbone_sequence(self.backbone)
        kept = sequence.upto_stage(pieces, token_stage)
        kept_ids = {id(p.module) for p in kept}
        for p in pieces:
            if id(p.module) not in kept_ids:
                # Unused stages would be parameters without gradients (federated updates and
                # Opacus expect every trainable tensor to get one) and dead checkpoint weight.
                parent, _, leaf = p.name.rpartition(".")
                holder = self.backbone.get_submodule(parent) if parent else self.backbone
                setattr(holder, leaf, nn.Identity())
        return kept

    def _probe_backbone(self, in_chans: int, size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        # One tiny forward gives the exact grid (padding rules differ between CNN families).
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                out = self.token_pool(self.feature_map(torch.zeros(1, in_chans, *size)))
        except (AssertionError, RuntimeError, ValueError) as exc:
            raise ValueError(
                f"backbone {self.backbone_name!r} cannot run at {size[0]} x {size[1]} px "
                f"({exc}); the hybrid needs a CNN with an NCHW feature map (e.g. convnext_tiny)"
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
    @property
    def backbone_pieces(self) -> list[sequence.Piece] | None:
        """The backbone's modules up to the token stage, in forward order (None: opaque)."""
        return None if self._pieces is None else list(self._pieces)

    def token_layer(self) -> nn.Module:
        """The backbone module whose output becomes the tokens (Grad-CAM's target)."""
        if self._pieces is not None:
            # The last piece that computes something (ConvNeXt's norm_pre is an Identity).
            return next(
                p.module for p in reversed(self._pieces) if any(True for _ in p.module.parameters())
            )
        bb: Any = self.backbone
        return bb.get_submodule(bb.feature_info[-1]["module"])

    def train(self, mode: bool = True) -> HybridCNNTransformer:
        """Train mode, except backbone modules that are wholly frozen (BatchNorm statistics)."""
        super().train(mode)
        if mode and self._pieces is not None:
            for p in self._pieces:
                params = list(p.module.parameters())
                if params and not any(q.requires_grad for q in params):
                    p.module.eval()
        return self

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Token-stage backbone feature map ``(B, F, h, w)``."""
        if self._pieces is None:
            out: torch.Tensor = self.backbone.forward_features(x)
            return out
        return sequence.run(self._pieces, x)

    def tokens_from_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """Spatial tokens ``(B, h*w, embed_dim)`` (incl. position embeddings) of a token-stage
        feature map (pooled here when ``token_pool > 1``); in training with ``token_drop``
        a random ``round((1 - token_drop) * h*w)`` of them per sample."""
        fmap = self.token_pool(fmap)
        t = self.proj(self.token_norm(fmap.permute(0, 2, 3, 1)))  # (B, h, w, D)
        t = self.pos_embed(t).flatten(1, 2)  # (B, h*w, D), row-major over the grid
        # After the position embeddings, so a kept token still says where it was.
        out: torch.Tensor = self.token_drop(self.pos_drop(t))
        return out

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial tokens fed to the encoder: ``(B, h*w, embed_dim)`` incl. position embeddings."""
        return self.tokens_from_map(self.feature_map(x))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoder blocks and the final LayerNorm over ``(B, N, embed_dim)`` tokens."""
        for blk in self.blocks:
            tokens = blk(tokens)
        out: torch.Tensor = self.norm(tokens)
        return out

    def classify_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """Logits from a token-stage feature map (what follows the backbone)."""
        return self.forward_head(self.encode(self.tokens_from_map(fmap)))

    # ----------------------------------------------------------------- timm-style API
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded tokens after the final LayerNorm: ``(B, N, embed_dim)``."""
        return self.encode(self.tokens(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool tokens; ``pre_logits=True`` returns the ``(B, embed_dim)`` embedding."""
        x = x.mean(dim=1)
        if pre_logits:
            return x
        out: torch.Tensor = self.head(self.head_drop(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for a normalised ``(B, C, H, W)`` batch."""
        logits = self.classify_map(self.feature_map(x))
        if self.flip_tta and not self.training:
            logits = 0.5 * (logits + self.classify_map(self.feature_map(x.flip(-1))))
        return logits

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


#: The name the first version had (ConvNeXt was its only backbone).
HybridConvNeXtViT = HybridCNNTransformer
