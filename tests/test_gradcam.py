"""Grad-CAM heatmaps: shape, range, dependence on the target class, layer choice, PNG output."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from kidneyscan.explain.gradcam import (
    colorize_heatmap,
    find_target_layers,
    gradcam_heatmap,
    overlay_heatmap,
    png_bytes,
)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    from kidneyscan.models.factory import create_classifier

    torch.manual_seed(0)
    return create_classifier("convnext_atto", 4).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 64, 64)


def test_target_layer_is_last_spatial_convnext_stage(model):
    (layer,) = find_target_layers(model, image_size=64)
    assert layer is model.stages[3]


def test_heatmap_matches_input_size_and_range(model, image):
    heat = gradcam_heatmap(model, image, target_class=0)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.max() > 0.0  # some evidence somewhere


def test_heatmap_changes_with_target_class(model, image):
    maps = [gradcam_heatmap(model, image, target_class=c) for c in range(4)]
    diffs = [np.abs(maps[0] - m).mean() for m in maps[1:]]
    assert min(diffs) > 1e-3


def test_heatmap_works_on_inference_mode_tensor(model, image):
    # The service prepares inputs under inference mode; Grad-CAM must still get gradients.
    with torch.inference_mode():
        frozen = image.clone()
    heat = gradcam_heatmap(model, frozen, target_class=1)
    np.testing.assert_allclose(heat, gradcam_heatmap(model, image, target_class=1), atol=1e-5)


def test_heatmap_leaves_no_hooks_behind(model, image):
    before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    gradcam_heatmap(model, image, target_class=2)
    after = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert after == before


def test_model_without_spatial_layer_is_a_clear_error():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(ValueError, match="spatial"):
        find_target_layers(flat, image_size=16)


def test_overlay_and_colour_map_shapes():
    img = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    heat = np.zeros((64, 64), np.float32)
    heat[10:20, 30:40] = 1.0
    rgba = colorize_heatmap(heat)
    over = overlay_heatmap(img, heat, alpha=0.5)
    assert rgba.shape == (64, 64, 4) and rgba.dtype == np.uint8
    assert rgba[15, 35, 3] > rgba[50, 5, 3]  # hot region more opaque than cold
    assert over.shape == (64, 64, 3) and over.dtype == np.uint8
    assert not np.array_equal(over[15, 35], over[50, 50])
    with pytest.raises(ValueError, match="shape"):
        overlay_heatmap(img, heat[:32], alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(img, heat, alpha=1.5)


def test_png_bytes_round_trip_without_metadata():
    arr = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    im = Image.open(io.BytesIO(png_bytes(arr)))
    np.testing.assert_array_equal(np.asarray(im), arr)
    assert im.info == {}


def test_hybrid_checkpoint_is_served_and_explained(tmp_path):
    # Prepare: the project's hybrid with a fully frozen backbone, saved as a checkpoint.
    import base64

    from _serve_support import HYBRID, ct_like, encode, make_checkpoint, multipart
    from kidneyscan.serve import ServeConfig, create_app

    ckpt = make_checkpoint(tmp_path / "hybrid", name="hybrid", kwargs=HYBRID)
    client = create_app(ServeConfig(checkpoint=ckpt, rate_limit=0)).test_client()
    png = encode(ct_like(80))
    # Execute
    maps = {}
    for cls in ("Cyst", "Tumor"):
        resp = client.post("/api/v1/explain", data={**multipart(png), "target_class": cls})
        assert resp.status_code == 200, resp.get_data(as_text=True)
        maps[cls] = resp.get_json()["results"][0]["explanation"]
    # Assert: Grad-CAM on the backbone's last ConvNeXt stage, heatmap depends on the class.
    assert maps["Cyst"]["layer"] == "backbone.stages.3.blocks.1"
    pngs = [base64.b64decode(m["heatmap_png"]) for m in maps.values()]
    heat = [np.asarray(Image.open(io.BytesIO(p))) for p in pngs]
    assert heat[0].shape == (64, 64, 4)
    assert np.abs(heat[0].astype(int) - heat[1].astype(int)).mean() > 0.5
