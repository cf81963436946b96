"""The kidney band: spine-anchored crop of both kidneys, its fallback, and the box it reports."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kidneyscan.data.datasets import load_image, scan_dataset
from kidneyscan.data.phantom import generate_dataset
from kidneyscan.preprocess import roi
from kidneyscan.preprocess.pipeline import Preprocessor


@pytest.fixture(scope="module")
def phantom128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom128")
    generate_dataset(out, n=100, seed=3, sites=3, image_size=128)
    return out


def test_band_holds_the_kidneys_of_phantom_slices(phantom128: Path) -> None:
    # Prepare: 100 phantom slices of 3 sites with their ground-truth kidney masks
    samples = scan_dataset(phantom128)
    inside, sources = [], []
    for s in samples:
        img = load_image(s.path)
        kidney = np.array(Image.open(phantom128 / "masks" / f"{s.image_id}_kidney.png")) > 0
        # Execute
        box = roi.kidney_band_box(img)
        sources.append(box.source)
        inside.append(kidney[box.top : box.bottom, box.left : box.right].sum() / kidney.sum())
    # Assert: the bar, >= 95 % of kidney pixels inside on >= 95 % of slices, and the
    # box came from the spine (not the body fallback) every time
    assert np.mean(np.array(inside) >= 0.95) >= 0.95
    assert set(sources) == {"spine"}


def test_band_is_the_measured_box_around_the_vertebra(phantom128: Path) -> None:
    img = load_image(scan_dataset(phantom128)[0].path)
    anterior, centre, posterior, area = roi.find_vertebra(img)  # type: ignore[misc]
    box = roi.kidney_band_box(img)
    h, w = img.shape
    # 300 x 200 px of a 512 px slice, centred on the vertebra, 130 px above its anterior edge
    assert (box.bottom - box.top, box.right - box.left) == (round(0.39 * h), round(0.586 * w))
    assert abs((box.left + box.right) / 2 - centre) <= 1
    assert abs(box.top - (anterior - 130 / 512 * h)) <= 1
    assert posterior > anterior and 0 < area < 0.2


def test_no_vertebra_falls_back_to_the_body_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a soft-tissue ellipse with no bone in it, and an empty image
    yy, xx = np.mgrid[0:128, 0:128]
    body = np.zeros((128, 128), np.float32)
    body[((yy - 64) / 40.0) ** 2 + ((xx - 64) / 55.0) ** 2 <= 1] = 0.5
    # Execute
    with caplog.at_level(logging.WARNING):
        box = roi.kidney_band_box(body)
    blank = roi.kidney_band_box(np.zeros((64, 64), np.float32))
    # Assert: the whole body, band-shaped (no distortion when resized), and a warning
    assert box.source == "body" and "no vertebra" in caplog.text
    assert box.top <= 24 and box.bottom >= 104 and box.left <= 9 and box.right >= 119
    assert abs((box.right - box.left) / (box.bottom - box.top) - 1.5) < 0.05
    assert blank.as_tuple() == (0, 0, 64, 64) and blank.source == "full"


def test_pipeline_reports_the_box_it_cropped(phantom128: Path) -> None:
    img = load_image(scan_dataset(phantom128)[1].path)
    pre = Preprocessor(steps=[{"name": "crop_kidney_band"}], image_size=32, image_width=48)
    out, box = pre.apply_steps_with_roi(img)
    ref = roi.kidney_band_box(img)
    assert box == ref.to_dict()
    assert out.shape == (ref.bottom - ref.top, ref.right - ref.left)
    np.testing.assert_array_equal(out, roi.crop_kidney_band(img))
    assert pre.image(img).shape == (32, 48)
    with pytest.raises(ValueError, match="below must be in"):
        roi.kidney_band_box(img, below=0.0)


@pytest.mark.realdata
def test_spine_found_on_real_slices(real_data: Path) -> None:
    # 1 in 5 real slices; on all 1,000 the spine was found on 989 (docs/dip.md)
    samples = scan_dataset(real_data)[::5]
    found = [roi.kidney_band_box(load_image(s.path)).source == "spine" for s in samples]
    assert np.mean(found) >= 0.95


def test_masked_band_keeps_the_kidneys_and_fills_the_rest(phantom128: Path) -> None:
    # Prepare: the first 12 phantom slices with their true kidney masks
    from kidneyscan.preprocess import anatomy

    samples = scan_dataset(phantom128)[:12]
    pre = Preprocessor(steps=[{"name": "crop_kidney_band_masked"}], image_size=32, image_width=48)
    kept, filled = [], []
    for s in samples:
        img = load_image(s.path)
        kidney = np.array(Image.open(phantom128 / "masks" / f"{s.image_id}_kidney.png")) > 0
        # Execute
        out, box = pre.apply_steps_with_roi(img)
        full = anatomy.mask_outside_kidneys(img)
        # Assert: the same box as the plain band (found on the unmasked slice), cut from the
        # masked slice, equal to the step called on its own
        ref = roi.kidney_band_box(img)
        assert box == ref.to_dict()
        t, lft, b, r = ref.as_tuple()
        np.testing.assert_array_equal(out, full[t:b, lft:r])
        np.testing.assert_array_equal(out, anatomy.crop_kidney_band_masked(img))
        untouched = full == img
        kept.append(untouched[kidney].mean())
        filled.append((full[t:b, lft:r] == np.float32(anatomy.MASK_FILL)).mean())
    # Assert: nearly all true kidney pixels keep their grey level, and most of the band is fill
    assert np.mean(kept) >= 0.9, kept
    assert np.mean(filled) >= 0.5, filled
    assert pre.image(load_image(samples[0].path)).shape == (32, 48)


def test_masked_band_without_kidneys_is_the_plain_band_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kidneyscan.preprocess import anatomy

    # Prepare: a soft-tissue ellipse, no bone: no vertebra, so no kidney either
    yy, xx = np.mgrid[0:128, 0:128]
    body = np.zeros((128, 128), np.float32)
    body[((yy - 64) / 40.0) ** 2 + ((xx - 64) / 55.0) ** 2 <= 1] = 0.5
    # Execute
    with caplog.at_level(logging.WARNING):
        out = anatomy.crop_kidney_band_masked(body)
    # Assert: nothing masked, a warning naming the missing kidneys, and bad options refused
    np.testing.assert_array_equal(out, roi.crop_kidney_band(body))
    assert "no kidney found" in caplog.text
    with pytest.raises(ValueError, match="dilate must be in"):
        anatomy.mask_outside_kidneys(body, dilate=0.5)
    with pytest.raises(ValueError, match="fill must be"):
        anatomy.mask_outside_kidneys(body, fill=2.0)
    with pytest.raises(ValueError, match="pixels= needs box="):
        from kidneyscan.preprocess.pipeline import register_step

        register_step("x", pixels=lambda im: im)
