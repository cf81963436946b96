"""Enhancement functions: contract (shape, dtype, range) and behaviour on known inputs."""

from __future__ import annotations

import numpy as np
import pytest

from kidneyscan.preprocess import enhance, metrics, morphology
from preprocess_synth import synth_slice


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    clean, _ = synth_slice(64, lesion="cyst", seed=3)
    rng = np.random.default_rng(0)
    return np.clip(clean + rng.normal(0, 0.03, clean.shape), 0, 1).astype(np.float32)


STEP_CALLS = [
    (enhance.rewindow, {"window": "kidney"}),
    (enhance.equalize_hist, {}),
    (enhance.equalize_clahe, {"clip_limit": 2.0, "tiles": 4}),
    (enhance.match_histogram, {"reference": np.linspace(0.2, 0.8, 16).tolist()}),
    (enhance.stretch_contrast, {"low": 2, "high": 98}),
    (enhance.adjust_gamma, {"gamma": 0.7}),
    (enhance.laplacian, {}),
    (enhance.sharpen_laplacian, {"amount": 0.5}),
    (enhance.unsharp_mask, {"radius": 1.5, "amount": 1.0}),
    (enhance.smooth_mean, {"size": 3}),
    (enhance.smooth_gaussian, {"sigma": 1.0}),
    (enhance.smooth_median, {"size": 5}),
    (enhance.smooth_bilateral, {}),
    (enhance.filter_frequency, {"pass_type": "lowpass", "kind": "ideal", "cutoff": 0.2}),
    (enhance.filter_frequency, {"pass_type": "lowpass", "kind": "butterworth"}),
    (enhance.filter_frequency, {"pass_type": "highpass", "kind": "gaussian"}),
    (enhance.filter_frequency, {"pass_type": "highpass", "kind": "butterworth", "boost": 1.0}),
    (morphology.dilate, {"shape": "square"}),
    (morphology.erode, {"shape": "diamond"}),
    (morphology.opening, {"shape": "cross", "radius": 2}),
    (morphology.closing, {"shape": "disk", "radius": 2}),
]


@pytest.mark.parametrize(("fn", "params"), STEP_CALLS, ids=lambda v: getattr(v, "__name__", ""))
def test_contract_shape_dtype_range(fn, params, image: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    out = fn(image, **params)
    assert out.shape == image.shape
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not np.array_equal(out, image), f"{fn.__name__} did nothing"


def test_window_ct_maps_hu_levels() -> None:
    hu = np.array([[-1000, -160, 40, 240, 1000]], dtype=np.int16)
    out = enhance.window_ct(hu, window=(40, 400))
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="unknown CT window"):
        enhance.window_ct(hu, window="lung-ish")


def test_rewindow_round_trip_is_identity_for_same_window() -> None:
    img = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    out = enhance.rewindow(img, window="abdomen", source="abdomen")
    np.testing.assert_allclose(out, img, atol=1e-6)


def test_equalize_flattens_histogram(image: np.ndarray) -> None:
    out = enhance.equalize_hist(image)
    # An equalised image's CDF is close to the identity: its mean is near 0.5.
    assert abs(float(out.mean()) - 0.5) < 0.05
    assert abs(float(image.mean()) - 0.5) > 0.1


def test_match_histogram_quantiles_equals_image_reference(image: np.ndarray) -> None:
    ref, _ = synth_slice(64, lesion="stone", seed=9)
    ref = np.clip(ref + np.random.default_rng(5).normal(0, 0.02, ref.shape), 0, 1)
    by_image = enhance.match_histogram(image, reference=ref)
    by_quant = enhance.match_histogram(image, reference=enhance.reference_quantiles(ref, n=4096))
    assert np.abs(by_image - by_quant).mean() < 0.01
    # The matched image has the reference's intensity distribution.
    assert abs(float(np.median(by_image)) - float(np.median(ref))) < 0.02


def test_stretch_recovers_linear_contrast_loss() -> None:
    clean, _ = synth_slice(64, seed=1)
    dull = 0.3 + 0.4 * clean
    out = enhance.stretch_contrast(dull, low=0, high=100)
    expected = (clean - clean.min()) / (clean.max() - clean.min())
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_kernel_convolve_flips_correlate() -> None:
    img = np.zeros((7, 7), np.float32)
    img[3, 3] = 1.0
    k = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]], np.float32)
    corr = enhance.apply_kernel(img, k, mode="correlate")
    conv = enhance.apply_kernel(img, k, mode="convolve")
    assert corr[3, 2] == 1.0 and conv[3, 4] == 1.0


def test_lowpass_removes_high_frequency_and_highpass_keeps_it() -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    low = 0.5 + 0.2 * np.sin(2 * np.pi * xx / 32)
    high = 0.1 * np.sin(2 * np.pi * 0.4 * yy)
    img = np.clip(low + high, 0, 1).astype(np.float32)
    for kind in ("ideal", "butterworth", "gaussian"):
        lp = enhance.filter_frequency(img, kind=kind, cutoff=0.15, order=4)
        assert np.abs(lp - low)[8:-8, 8:-8].mean() < 0.02, kind
        hp = enhance.filter_frequency(img, pass_type="highpass", kind=kind, cutoff=0.15, order=4)
        assert np.abs(hp - 0.5 - high)[8:-8, 8:-8].mean() < 0.02, kind


def test_smoothing_raises_psnr_on_gaussian_noise() -> None:
    # Prepare: sigma 0.1 Gaussian noise on a 64 px slice with sharp organ edges
    clean, _ = synth_slice(64, seed=2)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.1, clean.shape), 0, 1)
    base = metrics.psnr(clean, noisy)
    # Execute / Assert: linear smoothing gains >= 1.5 dB (edges blur), edge-aware >= 3 dB
    assert metrics.psnr(clean, enhance.smooth_gaussian(noisy, sigma=1.0)) > base + 1.5
    assert metrics.psnr(clean, enhance.smooth_mean(noisy, size=3)) > base + 1.5
    assert metrics.psnr(clean, enhance.smooth_median(noisy, size=3)) > base + 3.0
    assert metrics.psnr(clean, enhance.smooth_bilateral(noisy, sigma_color=0.2)) > base + 3.0


@pytest.mark.parametrize(
    ("fn", "params", "match"),
    [
        (enhance.smooth_median, {"size": 4}, "odd"),
        (enhance.adjust_gamma, {"gamma": -1}, "positive"),
        (enhance.stretch_contrast, {"low": 50, "high": 10}, "low < high"),
        (enhance.filter_frequency, {"cutoff": 0.9}, "cutoff"),
        (enhance.filter_frequency, {"kind": "box"}, "kind"),
        (enhance.equalize_clahe, {"tiles": 0}, "tiles"),
        (morphology.dilate, {"shape": "star"}, "footprint shape"),
    ],
)
def test_bad_parameters_raise(fn, params, match, image: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        fn(image, **params)


def test_rejects_uint8_scale_and_3d() -> None:
    with pytest.raises(ValueError, match="divide 8-bit data by 255"):
        enhance.equalize_hist(np.full((8, 8), 200.0))
    with pytest.raises(ValueError, match="2-D"):
        enhance.equalize_hist(np.zeros((8, 8, 3)))


def test_morphology_keeps_bool_masks() -> None:
    m = np.zeros((9, 9), bool)
    m[4, 4] = True
    grown = morphology.dilate(m, shape="square", radius=1)
    assert grown.dtype == bool and grown.sum() == 9
    assert morphology.erode(grown, shape="square", radius=1).sum() == 1
    assert morphology.dilate(m, shape="cross", radius=1).sum() == 5
