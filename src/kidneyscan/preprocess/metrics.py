"""Image-quality and mask-overlap metrics: thin wrappers over scikit-image.

All intensity metrics take float images in [0, 1] (``data_range=1``), mask metrics take bool
masks of equal shape.
"""

from __future__ import annotations

import numpy as np
from skimage import metrics as skm

from kidneyscan.preprocess._checks import as_image, as_mask


def _pair(reference: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = as_image(reference, name="reference")
    img = as_image(image, name="image")
    if ref.shape != img.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs image {img.shape}")
    return ref.astype(np.float64), img.astype(np.float64)


def mse(reference: np.ndarray, image: np.ndarray) -> float:
    """Mean squared error between two float images in [0, 1].

    Parameters
    ----------
    reference, image
        float (H, W) arrays in [0, 1] of equal shape.

    Returns
    -------
    float
        ``mean((reference - image) ** 2)``, as :func:`skimage.metrics.mean_squared_error`.
    """
    ref, img = _pair(reference, image)
    return float(skm.mean_squared_error(ref, img))


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB with ``data_range=1``.

    Identical images give ``inf`` (as scikit-image does).
    """
    ref, img = _pair(reference, image)
    if np.array_equal(ref, img):
        return float("inf")
    return float(skm.peak_signal_noise_ratio(ref, img, data_range=1.0))


def ssim(reference: np.ndarray, image: np.ndarray, *, win_size: int | None = None) -> float:
    """Structural similarity (scikit-image defaults: 7x7 uniform window, ``data_range=1``).

    Parameters
    ----------
    reference, image
        float (H, W) arrays in [0, 1] of equal shape, at least 7 px per side
        unless ``win_size`` is given.
    win_size
        Odd window side; ``None`` uses scikit-image's default of 7.
    """
    ref, img = _pair(reference, image)
    if min(ref.shape) < (win_size or 7):
        raise ValueError(f"images of shape {ref.shape} are smaller than the SSIM window")
    return float(skm.structural_similarity(ref, img, data_range=1.0, win_size=win_size))


def _masks(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = as_mask(truth, name="truth")
    p = as_mask(pred, name="pred")
    if t.shape != p.shape:
        raise ValueError(f"shape mismatch: truth {t.shape} vs pred {p.shape}")
    return t, p


def iou(truth: np.ndarray, pred: np.ndarray) -> float:
    """Intersection over union (Jaccard index) of two bool masks.

    Two empty masks agree perfectly and score 1.0 (no division by zero).
    """
    t, p = _masks(truth, pred)
    union = np.logical_or(t, p).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(t, p).sum() / union)


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice coefficient ``2|A & B| / (|A| + |B|)``; two empty masks score 1.0."""
    t, p = _masks(truth, pred)
    total = int(t.sum()) + int(p.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(t, p).sum() / total)
