"""Hybrid ConvNeXt + Transformer: shapes, spatial tokens, attention, freezing."""

from __future__ import annotations

import logging

import pytest
import torch

from kidneyscan.models.factory import create_classifier, trainable_state_keys
from kidneyscan.models.hybrid import HybridConvNeXtViT
from kidneyscan.models.weights import backbone_units, freeze_backbone

TINY = {"backbone": "convnext_atto", "image_size": 64, "embed_dim": 64, "depth": 1, "num_heads": 8}


@pytest.fixture(scope="module")
def tiny_hybrid() -> HybridConvNeXtViT:
    torch.manual_seed(0)
    model = HybridConvNeXtViT(4, **TINY)
    return model.eval()


def test_output_and_embedding_shapes(tiny_hybrid: HybridConvNeXtViT) -> None:
    # Prepare
    x = torch.randn(3, 3, 64, 64)
    # Execute
    logits = tiny_hybrid(x)
    emb = tiny_hybrid.forward_head(tiny_hybrid.forward_features(x), pre_logits=True)
    # Assert
    assert logits.shape == (3, 4)
    assert emb.shape == (3, 64)
    assert torch.isfinite(logits).all()


def test_encoder_sees_spatial_tokens(tiny_hybrid: HybridConvNeXtViT) -> None:
    # 64 px through a stride-32 ConvNeXt -> a 2 x 2 grid -> 4 tokens, not one pooled vector.
    tokens = tiny_hybrid.tokens(torch.randn(2, 3, 64, 64))
    assert tiny_hybrid.grid_size == (2, 2)
    assert tokens.shape == (2, 4, 64)
    assert tiny_hybrid.pos_embed.weight.shape == (1, 4, 64)


def test_default_geometry_is_77_tokens_of_768_from_the_ct_backbone() -> None:
    # ct_resnet152 on the 224 x 336 kidney band: a 7 x 11 grid of its last stage (random
    # weights here: only the configured geometry is read).
    model = HybridConvNeXtViT(4, depth=1)
    assert model.backbone_name == "ct_resnet152"
    assert (model.image_size, model.image_width) == (224, 336)
    assert model.grid_size == (7, 11)
    assert model.pos_embed.weight.shape == (1, 77, 768)
    assert model.blocks[0].attn.num_heads == 8
    assert type(model.token_layer()).__name__ == "Bottleneck"


def test_attention_varies_across_tokens(tiny_hybrid: HybridConvNeXtViT) -> None:
    # Prepare: an image with structure in one quadrant only
    x = torch.zeros(1, 3, 64, 64)
    x[:, :, :32, :32] = 2.0
    # Execute
    maps = tiny_hybrid.attention_maps(x)
    # Assert: one map per block, rows are distributions over 4 tokens that are not uniform
    assert len(maps) == 1
    attn = maps[0]
    assert attn.shape == (1, 8, 4, 4)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 8, 4))
    assert attn.std(dim=-1).max() > 1e-3
    assert not torch.allclose(attn[0, :, 0], attn[0, :, 3])


def test_other_input_size_interpolates_position_embeddings(tiny_hybrid: HybridConvNeXtViT) -> None:
    # 96 px gives a 3 x 3 grid; the learned 2 x 2 embeddings are resampled, not an error.
    x = torch.randn(1, 3, 96, 96)
    assert tiny_hybrid.tokens(x).shape == (1, 9, 64)
    assert tiny_hybrid(x).shape == (1, 4)


def test_freeze_fraction_counts_backbone_blocks(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare / Execute
    with caplog.at_level(logging.INFO, logger="kidneyscan"):
        model = HybridConvNeXtViT(4, **TINY, freeze_fraction=0.8)
    units = backbone_units(model.backbone)
    # Assert: convnext_atto has stem + 2 + 2 + 6 + 2 blocks = 13 units; round(0.8 * 13) = 10
    assert len(units) == 13
    frozen = [all(not p.requires_grad for p in ps) for _, ps in units]
    assert frozen == [True] * 10 + [False] * 3
    assert units[11][0] == "stages.3.blocks.0"  # carries stage 3's downsample layer
    assert all(p.requires_grad for p in model.backbone.stages[3].downsample.parameters())
    # The new parts always train.
    for part in (model.proj, model.blocks, model.norm, model.head):
        assert all(p.requires_grad for p in part.parameters())
    assert model.pos_embed.weight.requires_grad
    assert "parameters trainable" in caplog.text


@pytest.mark.parametrize(("fraction", "n_frozen"), [(0.0, 0), (0.5, 6), (1.0, 13)])
def test_freeze_backbone_fraction(fraction: float, n_frozen: int) -> None:
    model = HybridConvNeXtViT(4, **TINY, freeze_fraction=0.0)
    info = freeze_backbone(model, fraction)
    assert info["frozen_units"] == n_frozen
    assert info["total_units"] == 13
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["trainable"] == trainable
    assert (trainable < info["total"]) == (n_frozen > 0)


def test_frozen_backbone_gets_no_gradient_and_trainable_parts_do() -> None:
    model = HybridConvNeXtViT(4, **TINY, freeze_fraction=0.8, dropout=0.0)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.backbone.stem[0].weight.grad is None
    # Every trainable parameter is used (Opacus / federated updates rely on that).
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_no_batchnorm_in_trainable_parts() -> None:
    model = HybridConvNeXtViT(4, **TINY, freeze_fraction=0.0)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn == []


def test_grayscale_input() -> None:
    model = create_classifier("hybrid", 2, in_chans=1, **TINY)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 2)


def test_trainable_state_keys_are_stable() -> None:
    torch.manual_seed(0)
    a = create_classifier("hybrid", 4, **TINY)
    torch.manual_seed(1)
    b = create_classifier("hybrid", 4, **TINY)
    keys = trainable_state_keys(a)
    assert keys == trainable_state_keys(b)
    assert "head.weight" in keys and "pos_embed.weight" in keys
    assert not any(k.startswith("backbone.stem") for k in keys)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embed_dim": 60, "num_heads": 8}, "divisible"),
        ({"depth": 0}, "depth"),
        ({"dropout": 1.5}, "dropout"),
        ({"freeze_fraction": 2.0}, "freeze fraction"),
        ({"backbone": "vit_tiny_patch16_224"}, "NCHW"),
        ({"backbone": "no_such_net"}, "unknown model"),
        ({"token_drop": 1.0}, "token_drop must be in"),
        ({"token_drop": -0.1}, "token_drop must be in"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs: dict, message: str) -> None:
    opts = {**TINY, **kwargs}
    with pytest.raises(ValueError, match=message):
        HybridConvNeXtViT(4, **opts)


def test_token_drop_trains_on_a_random_subset_and_infers_on_every_token() -> None:
    # 128 px -> a 4 x 4 grid; token_drop 0.75 keeps 4 of the 16 tokens per training sample.
    torch.manual_seed(0)
    model = HybridConvNeXtViT(4, **{**TINY, "image_size": 128}, token_drop=0.75, dropout=0.0)
    assert model.options["token_drop"] == 0.75  # stored in checkpoints with the other options
    x = torch.randn(8, 3, 128, 128)
    fmap = model.feature_map(x)
    model.eval()
    every = model.tokens_from_map(fmap)
    model.train()
    kept = model.tokens_from_map(fmap)
    # Assert: 4 tokens in training, 16 at inference
    assert every.shape == (8, 16, 64)
    assert kept.shape == (8, 4, 64)
    # each kept token is one of that sample's tokens (position embedding included), in grid order
    match = (kept[:, :, None, :] - every[:, None, :, :]).abs().amax(-1) < 1e-6  # (B, 4, 16)
    assert bool((match.sum(-1) == 1).all())
    index = match.float().argmax(-1)
    assert bool((index.diff(dim=1) > 0).all())
    # drawn per sample, and again on the next call
    assert len({tuple(r.tolist()) for r in index}) > 1
    assert not torch.equal(model.tokens_from_map(fmap), kept)
    # inference is deterministic over every token; training works end to end
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    model(x).sum().backward()
    assert model.proj.weight.grad is not None


@pytest.mark.filterwarnings("ignore:Full backward hook")  # Opacus hooks; the stem input
@pytest.mark.parametrize(("freeze", "token_drop"), [(0.8, 0.0), (0.0, 0.0), (0.8, 0.5)])
def test_opacus_per_sample_gradients_cover_every_trainable_parameter(
    freeze: float, token_drop: float
) -> None:
    # DP-SGD (federated area) needs a per-sample gradient for each trainable tensor.
    opacus = pytest.importorskip("opacus")
    from opacus.validators import ModuleValidator

    # Prepare
    torch.manual_seed(0)
    model = HybridConvNeXtViT(
        4, **TINY, freeze_fraction=freeze, dropout=0.0, token_drop=token_drop
    ).train()
    assert ModuleValidator.validate(model, strict=False) == []
    gsm = opacus.GradSampleModule(model, loss_reduction="sum")
    # Execute
    logits = gsm(torch.randn(3, 3, 64, 64))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]), reduction="sum").backward()
    # Assert: per-sample gradients exist and add up to the batch gradient
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad_sample is not None, name
            assert p.grad_sample.shape == (3, *p.shape), name
            torch.testing.assert_close(p.grad_sample.sum(0), p.grad, atol=1e-5, rtol=1e-3)
