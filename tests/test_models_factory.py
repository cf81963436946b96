"""Model factory: every project name builds, predicts, embeds and names its Grad-CAM layer."""

from __future__ import annotations

import json

import pytest
import torch

from kidneyscan.models.factory import (
    MODEL_NAMES,
    create_classifier,
    default_cfg,
    gradcam_reshape_transform,
    gradcam_target_layers,
    model_spec,
    trainable_state_keys,
)

HYBRID = {"backbone": "convnext_atto", "image_size": 64, "embed_dim": 32, "depth": 1}

# (name, kwargs, input side, embedding size). Heavy ones run once at a tiny input size.
CASES = [
    ("small_cnn", {"width": 8}, 64, 64),
    ("hybrid", HYBRID, 64, 32),
    ("googlenet", {}, 64, 1024),
    ("resnet50", {}, 64, 2048),
    ("mobilenetv2", {}, 64, 1280),
    ("efficientnet_lite0", {}, 64, 1280),
    ("inception_v3", {}, 75, 2048),
    ("swin_t", {"img_size": 64}, 64, 768),
    ("resnet10t", {}, 64, 512),  # any timm name
    pytest.param("densenet169", {}, 64, 1664, marks=pytest.mark.slow),
    pytest.param("vit_b16", {"img_size": 32, "depth": 2}, 32, 768, marks=pytest.mark.slow),
    pytest.param("vgg19", {}, 32, 4096, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "kwargs", "size", "dim"), CASES)
def test_every_model_predicts_embeds_and_has_gradcam_layer(
    name: str, kwargs: dict, size: int, dim: int
) -> None:
    # Prepare
    torch.manual_seed(0)
    model = create_classifier(name, 4, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    seen: list[torch.Tensor] = []
    layer = gradcam_target_layers(model)[0]
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    # Execute
    with torch.no_grad():
        logits = model(x)
        emb = model.forward_head(model.forward_features(x), pre_logits=True)
    hook.remove()
    # Assert
    assert logits.shape == (2, 4)
    assert emb.shape == (2, dim)
    assert torch.isfinite(logits).all()
    fmap = seen[0]
    reshape = gradcam_reshape_transform(model)
    if reshape is not None:
        fmap = reshape(fmap)
    assert fmap.ndim == 4 and fmap.shape[0] == 2 and min(fmap.shape[2:]) >= 1
    spec = model_spec(model)
    assert spec["name"] == name
    json.dumps(spec)


def test_grayscale_models_take_one_channel() -> None:
    for name, kwargs in [("small_cnn", {"width": 8}), ("googlenet", {}), ("resnet10t", {})]:
        model = create_classifier(name, 2, in_chans=1, **kwargs).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2)


def test_freeze_fraction_for_baselines_keeps_head_trainable() -> None:
    model = create_classifier("resnet10t", 4, freeze_fraction=1.0)
    keys = trainable_state_keys(model)
    assert keys == ["fc.weight", "fc.bias"]
    model = create_classifier("resnet10t", 4, freeze_fraction=0.5)
    keys = trainable_state_keys(model)
    assert "layer4.0.conv1.weight" in keys and "conv1.0.weight" not in keys


def test_default_cfg_follows_the_model() -> None:
    assert default_cfg("vit_b16")["mean"] == (0.5, 0.5, 0.5)
    assert default_cfg("vit_b16")["input_size"] == (3, 224, 224)
    assert default_cfg("inception_v3")["image_size"] == 299
    # the hybrid's default backbone (the CT ResNet-152) keeps the kidney band's 1.5 aspect
    assert default_cfg("hybrid", image_size=128)["input_size"] == (3, 128, 192)
    assert default_cfg("hybrid", backbone="convnext_atto", image_size=128)["input_size"] == (
        3,
        128,
        128,
    )
    assert default_cfg("hybrid", image_size=64, image_width=80)["image_width"] == 80
    assert default_cfg("efficientnet_lite0")["std"] == (0.5, 0.5, 0.5)
    assert default_cfg("small_cnn", in_chans=1)["input_size"] == (1, 224, 224)
    assert set(default_cfg("googlenet")) >= {"input_size", "mean", "std", "image_size"}


def test_project_names_are_listed() -> None:
    assert {"hybrid", "small_cnn", "resnet50", "vgg19", "mobilenetv2", "densenet169"} <= set(
        MODEL_NAMES
    )
    assert {"googlenet", "inception_v3", "vit_b16", "swin_t"} <= set(MODEL_NAMES)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("no_such_model", {}, "unknown model"),
        ("small_cnn", {"colour": True}, "bad option"),
        ("resnet10t", {"bogus_option": 1}, "does not accept"),
        ("small_cnn", {"in_chans": 2}, "in_chans"),
        ("small_cnn", {"pretrained": True}, "no pretrained"),
        ("resnet10t", {"pretrained": True, "weights": "x.pth"}, "not both"),
        ("small_cnn", {"width": object()}, "JSON"),
    ],
)
def test_bad_requests_raise_clear_errors(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_classifier(name, 4, **kwargs)


def test_num_classes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_classifier("small_cnn", 0)


def test_image_size_is_accepted_by_every_model() -> None:
    # The engine passes image_size to any model; fixed-size transformers get it as img_size.
    hybrid = create_classifier("hybrid", 4, backbone="convnext_atto", image_size=96, depth=1)
    assert hybrid.grid_size == (3, 3)
    vit = create_classifier("vit_tiny_patch16_224", 4, image_size=32)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    cnn = create_classifier("small_cnn", 4, width=4, image_size=96)
    assert cnn(torch.randn(1, 3, 96, 96)).shape == (1, 4)
    assert model_spec(cnn)["kwargs"]["image_size"] == 96
