"""Noise models and restoration filters: contract, reproducibility, quality bounds, restore_auto."""

from __future__ import annotations

import numpy as np
import pytest

from kidneyscan.preprocess import metrics, noise, restore
from preprocess_synth import synth_slice


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    # A little smooth texture: real and phantom tissue is not piecewise constant.
    from scipy import ndimage as ndi

    img, _ = synth_slice(64, lesion="cyst", seed=4)
    texture = ndi.gaussian_filter(np.random.default_rng(0).normal(0, 0.03, img.shape), 1.0)
    return np.clip(img + texture, 0, 1).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(noise.NOISE_MODELS))
def test_noise_models_are_seeded_and_in_range(kind: str, clean: np.ndarray) -> None:
    a = noise.add_noise(clean, kind, rng=7)
    b = noise.add_noise(clean, kind, rng=np.random.default_rng(7))
    c = noise.add_noise(clean, kind, rng=8)
    assert a.shape == clean.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert metrics.psnr(clean, a) < 35.0  # it really degrades


@pytest.mark.parametrize("kind", ["gaussian", "exponential", "erlang", "rayleigh", "uniform"])
def test_additive_noise_is_zero_mean_with_requested_sigma(kind: str) -> None:
    flat = np.full((128, 128), 0.5, np.float32)
    out = noise.add_noise(flat, kind, rng=0, sigma=0.04)
    assert abs(float(out.mean()) - 0.5) < 0.002
    assert float(out.std()) == pytest.approx(0.04, rel=0.05)


def test_noise_needs_rng_and_known_kind(clean: np.ndarray) -> None:
    with pytest.raises(ValueError, match="reproducible"):
        noise.add_gaussian(clean)
    with pytest.raises(ValueError, match="unknown noise model"):
        noise.add_noise(clean, "pink", rng=0)


FILTERS = [
    (restore.mean_arithmetic, {}),
    (restore.mean_geometric, {}),
    (restore.mean_harmonic, {}),
    (restore.mean_contraharmonic, {"q": -1.5}),
    (restore.filter_median, {}),
    (restore.median_adaptive, {}),
    (restore.mean_alpha_trimmed, {"size": 3, "d": 2}),
    (restore.filter_wiener, {}),
    (restore.denoise_nlm, {}),
    (restore.denoise_tv, {}),
    (restore.denoise_bm3d, {}),
    (restore.notch_filter, {}),
    (restore.restore_auto, {}),
]


@pytest.mark.parametrize(("fn", "params"), FILTERS, ids=lambda v: getattr(v, "__name__", ""))
def test_restoration_contract(fn, params, clean: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    noisy = noise.add_gaussian(clean, sigma=0.05, rng=1)
    out = fn(noisy, **params)
    assert out.shape == clean.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_median_raises_psnr_on_salt_and_pepper_by_8_db(clean: np.ndarray) -> None:
    # Prepare: 10 % impulse noise
    noisy = noise.add_salt_pepper(clean, amount=0.10, rng=2)
    base = metrics.psnr(clean, noisy)
    # Execute
    med = metrics.psnr(clean, restore.filter_median(noisy, size=3))
    adaptive = metrics.psnr(clean, restore.median_adaptive(noisy, max_size=7))
    mean = metrics.psnr(clean, restore.mean_arithmetic(noisy, size=3))
    # Assert: median beats noisy by >= 8 dB and the mean filter by >= 5 dB; adaptive >= plain
    assert med > base + 8.0
    assert med > mean + 5.0
    assert adaptive >= med


def test_contraharmonic_sign_picks_impulse_polarity(clean: np.ndarray) -> None:
    pepper = noise.add_salt_pepper(clean, amount=0.1, salt_vs_pepper=0.0, rng=3)
    salt = noise.add_salt_pepper(clean, amount=0.1, salt_vs_pepper=1.0, rng=3)
    good_p = metrics.psnr(clean, restore.mean_contraharmonic(pepper, q=1.5))
    bad_p = metrics.psnr(clean, restore.mean_contraharmonic(pepper, q=-1.5))
    good_s = metrics.psnr(clean, restore.mean_contraharmonic(salt, q=-1.5))
    bad_s = metrics.psnr(clean, restore.mean_contraharmonic(salt, q=1.5))
    assert good_p > bad_p + 3.0
    assert good_s > bad_s + 3.0


def test_alpha_trimmed_limits_are_mean_and_median(clean: np.ndarray) -> None:
    noisy = noise.add_gaussian(clean, sigma=0.05, rng=4)
    # Interior only: OpenCV's box filter and SciPy's median reflect borders differently.
    np.testing.assert_allclose(
        restore.mean_alpha_trimmed(noisy, size=3, d=0)[1:-1, 1:-1],
        restore.mean_arithmetic(noisy, size=3)[1:-1, 1:-1],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        restore.mean_alpha_trimmed(noisy, size=3, d=8), restore.filter_median(noisy, size=3)
    )
    with pytest.raises(ValueError, match="even integer"):
        restore.mean_alpha_trimmed(noisy, size=3, d=3)


def test_denoisers_beat_box_filter_on_gaussian_noise() -> None:
    img, _ = synth_slice(96, seed=5)
    noisy = noise.add_gaussian(img, sigma=0.06, rng=5)
    box = metrics.psnr(img, restore.mean_arithmetic(noisy, size=3))
    for fn in (restore.denoise_nlm, restore.denoise_tv, restore.denoise_bm3d):
        assert metrics.psnr(img, fn(noisy)) > box + 1.0, fn.__name__


def test_notch_removes_periodic_noise(clean: np.ndarray) -> None:
    noisy = noise.add_periodic(clean, amplitude=0.1, frequency=0.2, angle=30.0, rng=6)
    peaks = restore.find_periodic_peaks(noisy)
    assert len(peaks) >= 1
    assert restore.find_periodic_peaks(clean) == []
    out = restore.notch_filter(noisy)
    assert metrics.psnr(clean, out) > metrics.psnr(clean, noisy) + 5.0


@pytest.mark.parametrize(
    ("kind", "params", "expected", "family"),
    [
        ("salt_pepper", {"amount": 0.05}, "impulse", "median_adaptive"),
        ("periodic", {"amplitude": 0.08, "frequency": 0.15}, "periodic", "notch"),
        ("gaussian", {"sigma": 0.05}, "random", "nlm"),
        ("rayleigh", {"sigma": 0.05}, "random", "nlm"),
        ("poisson", {"peak": 100.0}, "random", "nlm"),
    ],
)
def test_restore_auto_picks_filter_family(kind, params, expected, family) -> None:  # type: ignore[no-untyped-def]
    img, _ = synth_slice(96, lesion="stone", seed=7)
    noisy = noise.add_noise(img, kind, rng=8, **params)
    est = restore.estimate_noise(noisy)
    assert est.kind == expected
    assert restore.choose_restoration(est)[0]["name"] == family
    out = restore.restore_auto(noisy)
    assert metrics.psnr(img, out) > metrics.psnr(img, noisy) + 3.0


def test_clean_image_is_left_alone() -> None:
    img, _ = synth_slice(96, seed=9)
    est = restore.estimate_noise(img)
    assert est.kind == "none"
    assert restore.choose_restoration(est) == []
    np.testing.assert_array_equal(restore.restore_auto(img), img)


def test_denoise_dispatch_and_errors(clean: np.ndarray) -> None:
    noisy = noise.add_gaussian(clean, sigma=0.05, rng=1)
    np.testing.assert_array_equal(
        restore.denoise(noisy, method="median", size=3), restore.filter_median(noisy, size=3)
    )
    with pytest.raises(ValueError, match="unknown denoise method"):
        restore.denoise(noisy, method="magic")
