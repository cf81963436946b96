"""Frozen-prefix split and cached features of the hybrid (faster CPU training)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn


def _hybrid(freeze: float = 0.8) -> nn.Module:
    from kidneyscan.models.factory import create_classifier

    torch.manual_seed(0)
    return create_classifier(
        "hybrid", 4, backbone="convnext_atto", image_size=64, embed_dim=32, depth=1, num_heads=4,
        freeze_fraction=freeze, dropout=0.0,
    )  # fmt: skip


def test_split_matches_model_and_builds_no_graph_for_frozen_prefix():
    # Prepare
    from kidneyscan.export.fasttrain import FrozenSplit

    model = _hybrid().eval()
    split = FrozenSplit(model)
    x = torch.randn(3, 3, 64, 64)
    # Execute
    with torch.no_grad():
        ref = model(x)
    feats = split.features(x)
    out = split.rest(feats)
    # Assert: same logits; prefix ends before the first trainable module; no autograd state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert 0 < split.n_frozen_modules < split.n_modules
    assert not any(p.requires_grad for p in split.prefix.parameters())
    assert any(p.requires_grad for p in split.suffix.parameters())
    assert feats.grad_fn is None and not feats.requires_grad
    assert out.grad_fn is not None


def test_prefix_features_fold_batchnorm_and_follow_changed_weights():
    """Breaks if the fast prefix (BatchNorm folded, channels-last) gave other features than the
    plain prefix in eval mode, kept BatchNorm, or went stale after a prefix weight changed."""
    # Prepare: a ResNet prefix (BatchNorm after every convolution)
    from kidneyscan.models.factory import create_classifier
    from kidneyscan.models.frozen import FrozenSplit

    torch.manual_seed(0)
    model = create_classifier(
        "hybrid", 4, backbone="resnet10t", token_stage=2, freeze_fraction=1.0, image_size=64,
        embed_dim=32, depth=1, num_heads=4,
    )  # fmt: skip
    split = FrozenSplit(model)
    x = torch.randn(2, 3, 64, 64)

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return split.prefix.eval()(x)

    # Execute
    first = split.features(x)
    with torch.no_grad():
        next(split.prefix.parameters()).mul_(1.5)
    second = split.features(x)
    # Assert
    fast = split.__dict__["_fast"][1]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert first.is_contiguous() and second.is_contiguous()
    torch.testing.assert_close(second, plain(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(first, second, atol=1e-3)


def test_split_refuses_unfrozen_model_and_other_architectures():
    # Prepare
    from kidneyscan.export.fasttrain import FrozenSplit
    from kidneyscan.models.factory import create_classifier

    # Execute / Assert
    with pytest.raises(ValueError, match="no frozen"):
        FrozenSplit(_hybrid(freeze=0.0))
    with pytest.raises(ValueError, match="ConvNeXt"):
        FrozenSplit(create_classifier("small_cnn", 4, width=8))


def test_cached_epoch_trains_only_the_rest_and_detects_changed_frozen_weights():
    # Prepare
    from kidneyscan.export.fasttrain import FeatureCache, FrozenSplit, train_epoch_cached

    model = _hybrid()
    split = FrozenSplit(model)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 64, 64, generator=gen), torch.tensor([0, 1, 2, 3]))] * 2
    cache = FeatureCache(split, data)
    frozen_before = [p.clone() for p in split.prefix.parameters()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_before = model.head.weight.clone()
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    # Execute
    stats = [train_epoch_cached(split, cache, opt, nn.CrossEntropyLoss(), batch_size=4, seed=s)
             for s in range(3)]  # fmt: skip
    # Assert
    assert len(cache) == 8 and cache.nbytes > 0
    assert all(s["n"] == 8 for s in stats) and stats[-1]["loss"] < stats[0]["loss"]
    assert not torch.equal(model.head.weight, head_before)
    assert all(
        torch.equal(a, b) for a, b in zip(frozen_before, split.prefix.parameters(), strict=True)
    )
    with torch.no_grad():
        next(split.prefix.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="frozen weights changed"):
        train_epoch_cached(split, cache, opt, nn.CrossEntropyLoss())


def test_feature_augment_flips_and_validates():
    # Prepare
    from kidneyscan.export.fasttrain import feature_augment

    f = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    # Execute
    flipped = feature_augment(f, flip_p=1.0)
    same = feature_augment(f, flip_p=0.0)
    # Assert
    torch.testing.assert_close(flipped, f.flip(-1))
    torch.testing.assert_close(same, f)
    with pytest.raises(ValueError, match="flip_p"):
        feature_augment(f, flip_p=2.0)
