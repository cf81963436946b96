"""Metric wrappers agree with scikit-image / hand computation on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import metrics as skm

from kidneyscan.preprocess import metrics


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.random((32, 32)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    return a, b


def test_mse_psnr_ssim_match_skimage(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert metrics.mse(a, b) == pytest.approx(skm.mean_squared_error(a64, b64))
    assert metrics.psnr(a, b) == pytest.approx(
        skm.peak_signal_noise_ratio(a64, b64, data_range=1.0)
    )
    assert metrics.ssim(a, b) == pytest.approx(skm.structural_similarity(a64, b64, data_range=1.0))


def test_psnr_known_value() -> None:
    # Prepare: a constant error of 0.1 -> MSE 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    a = np.full((16, 16), 0.5, np.float32)
    b = a + 0.1
    # Execute / Assert
    assert metrics.mse(a, b) == pytest.approx(0.01, rel=1e-5)
    assert metrics.psnr(a, b) == pytest.approx(20.0, abs=1e-4)
    assert metrics.psnr(a, a) == float("inf")
    assert metrics.ssim(a, a) == pytest.approx(1.0)


def test_iou_dice_known_values() -> None:
    t = np.zeros((4, 4), bool)
    p = np.zeros((4, 4), bool)
    t[:2, :2] = True  # 4 px
    p[:2, :3] = True  # 6 px, overlap 4
    assert metrics.iou(t, p) == pytest.approx(4 / 6)
    assert metrics.dice(t, p) == pytest.approx(8 / 10)
    assert metrics.iou(t, ~t) == 0.0
    empty = np.zeros((4, 4), bool)
    assert metrics.iou(empty, empty) == 1.0
    assert metrics.dice(empty, empty) == 1.0


def test_dice_equals_f1_of_pixels() -> None:
    from sklearn.metrics import f1_score, jaccard_score

    rng = np.random.default_rng(1)
    t, p = rng.random((20, 20)) > 0.5, rng.random((20, 20)) > 0.4
    assert metrics.dice(t, p) == pytest.approx(f1_score(t.ravel(), p.ravel()))
    assert metrics.iou(t, p) == pytest.approx(jaccard_score(t.ravel(), p.ravel()))


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((4, 4)), np.zeros((5, 4)), "shape mismatch"),
        (np.zeros((4, 4)), np.full((4, 4), 2.0), r"\[0, 1\]"),
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), "2-D"),
    ],
)
def test_bad_inputs_raise(a: np.ndarray, b: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        metrics.mse(a, b)


def test_mask_metric_rejects_non_binary() -> None:
    with pytest.raises(ValueError, match="boolean"):
        metrics.iou(np.zeros((3, 3)), np.full((3, 3), 0.5))
