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
    (restore.median_switching, {}),
    (restore.mean_alpha_trimmed, {"size": 3, "d": 2}),
    (restore.filter_wiener, {}),
    (restore.denoise_nlm, {}),
    (restore.denoise_tv, {}),
    (restore.denoise_bm3d, {}),
    (restore.notch_filter, {}),
    (restore.subtract_periodic, {}),
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
        ("salt_pepper", {"amount": 0.05}, "impulse", "median_switching"),
        ("periodic", {"amplitude": 0.08, "frequency": 0.15}, "periodic", "periodic_subtract"),
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


def test_switching_median_leaves_uncorrupted_pixels_and_reaches_35_db(clean: np.ndarray) -> None:
    # Prepare: 5 % salt and pepper on a 64 px slice with black air around the body
    noisy = noise.add_salt_pepper(clean, amount=0.05, rng=2)
    flagged = restore.impulse_mask(noisy)
    # Execute
    out = restore.median_switching(noisy)
    one = restore.median_switching(noisy, passes=1)
    # Assert: only pixels at 0 or 1 ever change (one pass: only flagged ones), almost every
    # corrupted pixel is flagged, and the PSNR is >= 35 dB (measured 40.3; the adaptive
    # median gets far less on this slice)
    corrupted = np.abs(noisy - clean) > 0.1  # pepper on near-black air is no corruption
    grey = (noisy > 0) & (noisy < 1)
    np.testing.assert_array_equal(out[grey], noisy[grey])
    np.testing.assert_array_equal(one[~flagged], noisy[~flagged])
    assert (flagged & corrupted).sum() >= 0.9 * corrupted.sum()
    assert metrics.psnr(clean, out) >= 35.0
    assert metrics.psnr(clean, out) > metrics.psnr(clean, restore.median_adaptive(noisy)) + 3.0


def test_impulse_mask_ignores_black_air_and_thin_lines() -> None:
    img = np.zeros((32, 32), np.float32)  # black air
    img[8:24, 8:24] = 0.5
    img[28, :] = 1.0  # a 1-px table line at full brightness
    assert not restore.impulse_mask(img).any()
    img[15, 15] = 1.0  # one salt impulse inside tissue
    assert restore.impulse_mask(img).sum() == 1


def test_switching_median_rejects_bad_parameters(clean: np.ndarray) -> None:
    with pytest.raises(ValueError, match="passes"):
        restore.median_switching(clean, passes=0)
    with pytest.raises(ValueError, match="threshold"):
        restore.median_switching(clean, threshold=1.5)
    with pytest.raises(ValueError, match="max_size"):
        restore.median_switching(clean, max_size=4)


def test_declip_undoes_the_clipping_bias() -> None:
    # The mean of clipped N(0, 0.05) noise on black is 0.05 / sqrt(2 pi) = 0.0199
    biased = np.full((8, 8), 0.05 / np.sqrt(2 * np.pi), np.float32)
    assert float(restore.declip(biased, sigma=0.05).max()) < 1e-3
    mid = np.full((8, 8), 0.5, np.float32)
    np.testing.assert_allclose(restore.declip(mid, sigma=0.05), mid, atol=1e-4)
    with pytest.raises(ValueError, match="sigma"):
        restore.declip(mid, sigma=0.0)


def test_clipped_gaussian_noise_is_detected_and_declipped(clean: np.ndarray) -> None:
    noisy = noise.add_gaussian(clean, sigma=0.05, rng=3)
    est = restore.estimate_noise(noisy)
    assert est.kind == "random" and est.clipped
    assert est.sigma == pytest.approx(0.05, rel=0.3)  # the whole-image estimate is ~30 % low
    assert [s["name"] for s in restore.choose_restoration(est)] == ["nlm", "declip"]
    plain = restore.denoise_nlm(noisy, sigma=est.sigma, h_factor=1.0)
    # measured +1.0 dB on this 64 px slice, +2.9 dB on the 256 px phantom (bench)
    assert metrics.psnr(clean, restore.restore_auto(noisy)) > metrics.psnr(clean, plain) + 0.5


def test_periodic_subtraction_beats_the_notch(clean: np.ndarray) -> None:
    noisy = noise.add_periodic(clean, amplitude=0.1, frequency=0.2, angle=30.0, rng=6)
    out = restore.subtract_periodic(noisy)
    # measured: noisy 24.4 dB, notch 29.8, subtraction 31.9
    assert metrics.psnr(clean, out) > metrics.psnr(clean, restore.notch_filter(noisy)) + 1.0
    np.testing.assert_array_equal(restore.subtract_periodic(clean), clean)  # no spike: unchanged


# A 4 x 4 image small enough to check by hand; every value is positive, so the 1e-4 offset
# that keeps log / reciprocal finite on black pixels only shifts the reference slightly.
SMALL = np.array(
    [
        [0.10, 0.20, 0.30, 0.40],
        [0.50, 0.60, 0.70, 0.80],
        [0.90, 0.20, 0.40, 0.60],
        [0.30, 0.50, 0.70, 0.10],
    ],
    dtype=np.float32,
)
EPS = 1e-4  # restore._EPS


def _windows(image: np.ndarray, size: int, mode: str) -> list[list[np.ndarray]]:
    """Each pixel's size x size neighbourhood, padded by mirroring or with zeros."""
    r = size // 2
    pad = np.pad(image.astype(np.float64), r, mode=mode)
    h, w = image.shape
    return [[pad[i : i + size, j : j + size] for j in range(w)] for i in range(h)]


@pytest.mark.parametrize("size", [3, 5])
def test_geometric_and_harmonic_means_match_a_hand_computation(size: int) -> None:
    """Breaks if the geometric mean is not the n-th root of the window product, the harmonic
    mean not n / sum(1/x), or the border is not mirrored (d c b a | a b c d, as the other
    filters; a 5 x 5 window tells it from edge repetition); the reference uses products and
    sums, not the filters' log / box trick."""
    n = size * size
    win = _windows(SMALL + EPS, size, "symmetric")
    geo = np.array([[np.prod(v) ** (1 / n) for v in row] for row in win]) - EPS
    har = np.array([[n / np.sum(1 / v) for v in row] for row in win]) - EPS
    # Pixel (1, 1) on paper: its window is 0.1 0.2 0.3 / 0.5 0.6 0.7 / 0.9 0.2 0.4, product
    # 9.072e-5, 9th root 0.3555; sum of reciprocals 32.04, 9 / 32.04 = 0.2809.
    if size == 3:
        assert geo[1, 1] == pytest.approx(0.3555, abs=1e-4)
        assert har[1, 1] == pytest.approx(0.2809, abs=1e-4)

    np.testing.assert_allclose(restore.mean_geometric(SMALL, size=size), geo, atol=1e-6)
    np.testing.assert_allclose(restore.mean_harmonic(SMALL, size=size), har, atol=1e-6)


@pytest.mark.parametrize("noise_var", [None, 0.01])
def test_wiener_matches_a_hand_computation(noise_var: float | None) -> None:
    """Breaks if the filter is not ``m + (1 - noise / var) (x - m)`` with the local mean and
    variance of a zero-padded window (SciPy's), ``m`` where the variance is below the noise,
    the noise defaulting to the mean local variance. On a flat image the windows clear of the
    zero padding return the input; on a black one SciPy computes 0 / 0, which must become
    the input (0), not NaN or anything else."""
    win = _windows(SMALL, 3, "constant")
    mean = np.array([[v.mean() for v in row] for row in win])
    var = np.array([[(v**2).mean() for v in row] for row in win]) - mean**2
    noise = var.mean() if noise_var is None else noise_var
    x = SMALL.astype(np.float64)
    want = np.where(var < noise, mean, mean + (1 - noise / var) * (x - mean))

    got = restore.filter_wiener(SMALL, size=3, noise=noise_var)

    np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=1e-6)
    flat = np.full((4, 4), 0.4, np.float32)
    np.testing.assert_allclose(restore.filter_wiener(flat, size=3)[1:3, 1:3], 0.4, atol=1e-7)
    black = np.zeros((4, 4), np.float32)
    np.testing.assert_array_equal(restore.filter_wiener(black, size=3), black)
