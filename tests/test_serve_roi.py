"""The page's data: the uploaded slice, the kidney-band box on it, the crop and its Grad-CAM."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _serve_support import KIDNEY_BAND, encode, make_checkpoint, multipart, no_spine, phantom_hu
from kidneyscan.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    # The default recipe's preprocessing in miniature: kidney band, 64 x 96 (3:2).
    ckpt = make_checkpoint(
        tmp_path_factory.mktemp("band"), steps=KIDNEY_BAND, image_size=64, image_width=96
    )
    return create_app(ServeConfig(checkpoint=ckpt, rate_limit=0)).test_client()


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _slice(size: int, seed: int = 0) -> bytes:
    from kidneyscan.data.phantom import window

    return encode((window(phantom_hu(size, seed)) * 255 + 0.5).astype(np.uint8))


def test_explain_returns_slice_box_and_crop_heatmap(client):
    # Prepare: a phantom slice whose vertebra the kidney band is anchored on.
    data = _slice(128)
    # Execute
    resp = client.post("/api/v1/explain", data=multipart(data))
    # Assert
    assert resp.status_code == 200, resp.get_data(as_text=True)
    res = resp.get_json()["results"][0]
    roi, ex = res["roi"], res["explanation"]
    assert roi["source"] == "spine"
    assert 0 <= roi["top"] < roi["bottom"] <= 128 and 0 <= roi["left"] < roi["right"] <= 128
    # A 3:2 band, smaller than the slice: the box the page draws is a real crop.
    assert (roi["right"] - roi["left"]) / (roi["bottom"] - roi["top"]) == pytest.approx(1.5, 0.1)
    assert roi["right"] - roi["left"] < 128
    # The slice comes back whole (the box is in its pixels), the heatmap is the crop's.
    assert _png(ex["slice_png"]).shape == (128, 128) and ex["slice_scale"] == 1.0
    assert ex["size"] == [64, 96]
    assert _png(ex["image_png"]).shape == (64, 96)
    assert _png(ex["heatmap_png"]).shape == (64, 96, 4)
    assert not [w for w in res["warnings"] if "spine" in w]


def test_crop_image_is_the_box_of_the_slice(client):
    # The explained image must be the boxed region of the upload, resized: compare it with
    # the slice cut at the reported box.
    from kidneyscan.preprocess.pipeline import Preprocessor

    resize = Preprocessor(image_size=64, image_width=96).resize

    data = _slice(128, seed=3)
    res = client.post("/api/v1/explain", data=multipart(data)).get_json()["results"][0]
    roi = res["roi"]
    full = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255
    cut = full[roi["top"] : roi["bottom"], roi["left"] : roi["right"]]
    expected = resize(cut)
    got = _png(res["explanation"]["image_png"]).astype(np.float32) / 255
    assert np.abs(got - expected).max() <= 1.5 / 255
    # ...and not some other part of the slice.
    shifted = full[: roi["bottom"] - roi["top"], : roi["right"] - roi["left"]]
    other = resize(shifted)
    assert np.abs(got - other).mean() > 0.02


def test_no_spine_is_reported_with_the_whole_body_box(client):
    # Execute
    res = client.post("/api/v1/predict", data=multipart(encode(no_spine(96)))).get_json()
    # Assert
    item = res["results"][0]
    assert item["roi"]["source"] == "body"
    assert any("spine not found" in w and "whole body" in w for w in item["warnings"])


def test_large_slice_is_sent_back_shrunk_with_its_scale(client):
    # Prepare: a 1024 px slice; the page gets at most 512 px and the factor to scale the box.
    data = _slice(1024)
    # Execute
    res = client.post("/api/v1/explain", data=multipart(data)).get_json()["results"][0]
    # Assert
    ex = res["explanation"]
    assert _png(ex["slice_png"]).shape == (512, 512)
    assert ex["slice_size"] == [512, 512] and ex["slice_scale"] == pytest.approx(0.5)
    assert res["roi"]["right"] > 512  # box still in the upload's own pixels


def test_no_crop_step_gives_no_box(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "plain")
    client = create_app(ServeConfig(checkpoint=ckpt, rate_limit=0)).test_client()
    res = client.post("/api/v1/explain", data=multipart(_slice(96))).get_json()["results"][0]
    assert res["roi"] is None
    assert _png(res["explanation"]["slice_png"]).shape == (96, 96)
