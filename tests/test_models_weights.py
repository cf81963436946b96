"""Weight sources: local files (written here), bundled EfficientNet-Lite0, offline hub fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from kidneyscan.models.factory import create_classifier
from kidneyscan.models.hybrid import HybridConvNeXtViT
from kidneyscan.models.weights import (
    PretrainedUnavailableWarning,
    WeightsError,
    efficientnet_lite0_path,
    load_weights,
    read_state_dict,
)

HYBRID = {"backbone": "convnext_atto", "image_size": 64, "embed_dim": 32, "depth": 1}


def _reference_backbone_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(42)
    return timm.create_model("convnext_atto", num_classes=10).state_dict()


@pytest.mark.parametrize("fmt", ["pth-wrapped", "safetensors"])
def test_local_weights_load_into_hybrid_backbone(tmp_path: Path, fmt: str) -> None:
    # Prepare: a timm checkpoint as a training script would write it
    ref = _reference_backbone_state()
    if fmt == "safetensors":
        path = tmp_path / "convnext_atto.safetensors"
        save_file({k: v.contiguous() for k, v in ref.items()}, str(path))
    else:
        path = tmp_path / "convnext_atto.pth"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ref.items()}}, path)
    # Execute
    torch.manual_seed(0)
    model = HybridConvNeXtViT(4, **HYBRID, weights=path)
    # Assert: backbone tensors equal the file's; the 10-class head is not in the backbone
    got = model.backbone.state_dict()
    torch.testing.assert_close(got["stem.0.weight"], ref["stem.0.weight"])
    torch.testing.assert_close(
        got["stages.3.blocks.1.mlp.fc2.weight"], ref["stages.3.blocks.1.mlp.fc2.weight"]
    )


def test_load_report_counts_and_grayscale_adaptation(tmp_path: Path) -> None:
    ref = _reference_backbone_state()
    path = tmp_path / "w.pt"
    torch.save(ref, path)
    model = timm.create_model("convnext_atto", num_classes=4, in_chans=1)
    report = load_weights(model, path)
    assert report["adapted"] == ["stem.0.weight"]
    assert set(report["shape_mismatch"]) == {"head.fc.weight", "head.fc.bias"}
    assert report["missing"] == ["head.fc.weight", "head.fc.bias"]
    assert report["unexpected"] == []
    # timm's adapt_input_conv sums the RGB filters for one channel
    torch.testing.assert_close(model.stem[0].weight, ref["stem.0.weight"].sum(dim=1, keepdim=True))


def test_factory_loads_local_weights_into_torchvision_googlenet(tmp_path: Path) -> None:
    from torchvision.models import googlenet

    torch.manual_seed(1)
    tv = googlenet(weights=None, aux_logits=False, init_weights=True)
    path = tmp_path / "googlenet.pth"
    torch.save(tv.state_dict(), path)
    model = create_classifier("googlenet", 4, weights=path)
    torch.testing.assert_close(model.net.conv1.conv.weight, tv.conv1.conv.weight)
    assert model.net.fc.out_features == 4


def test_weights_that_match_nothing_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="no tensor matches"):
        HybridConvNeXtViT(4, **HYBRID, weights=path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.pth", None, "not found"),
        ("w.npz", b"abc", "unsupported weights format"),
        ("corrupt.pth", b"not a zip", "could not read"),
    ],
)
def test_unreadable_weight_files(tmp_path: Path, name: str, content: bytes | None, message: str):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        read_state_dict(path)


def test_no_tensors_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 1, "lr": 0.1}, path)
    with pytest.raises(WeightsError, match="no tensors"):
        read_state_dict(path)


def test_offline_pretrained_warns_and_initialises_randomly(monkeypatch: pytest.MonkeyPatch):
    # Prepare: simulate a machine without internet for timm's hub loading
    real_create = timm.create_model

    def offline_create(name: str, pretrained: bool = False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    # Execute / Assert: hybrid and a timm baseline both warn and still work
    with pytest.warns(PretrainedUnavailableWarning, match="random initialisation"):
        model = HybridConvNeXtViT(4, **HYBRID, pretrained=True)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    with pytest.warns(PretrainedUnavailableWarning, match="resnet10t"):
        base = create_classifier("resnet10t", 4, pretrained=True)
    assert base(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_offline_pretrained_googlenet_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models as tvm

    real = tvm.googlenet

    def offline(weights=None, **kwargs):
        if weights is not None:
            raise ConnectionError("no route to download.pytorch.org")
        return real(weights=None, **kwargs)

    monkeypatch.setattr(tvm, "googlenet", offline)
    with pytest.warns(PretrainedUnavailableWarning, match="googlenet"):
        model = create_classifier("googlenet", 4, pretrained=True)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_bundled_efficientnet_lite0_imagenet_weights() -> None:
    # Prepare
    raw = torch.load(efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    # Execute
    model = create_classifier("efficientnet_lite0", 4, weights="efficientnet-lite0")
    # Assert: renamed in order; stem and last block equal the package's tensors
    torch.testing.assert_close(model.conv_stem.weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(model.bn2.running_var, raw["_bn1.running_var"])
    assert model.classifier.out_features == 4  # the 1000-class layer was skipped
    hybrid = HybridConvNeXtViT(
        4,
        backbone="tf_efficientnet_lite0",
        image_size=64,
        embed_dim=32,
        depth=1,
        weights="efficientnet-lite0",
    )
    torch.testing.assert_close(hybrid.backbone.conv_stem.weight, raw["_conv_stem.weight"])
    assert hybrid(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_efficientnet_lite0_weights_only_fit_their_architecture() -> None:
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0"):
        create_classifier("resnet10t", 4, weights="efficientnet-lite0")
