"""Input validation shared by the DIP functions (clear errors instead of silent garbage)."""

from __future__ import annotations

import numpy as np


def as_image(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Return ``image`` as a float32 (H, W) array in [0, 1] or raise a clear ``ValueError``.

    Parameters
    ----------
    image
        Grayscale image; any real dtype is accepted but values must lie in [0, 1]
        (a tolerance of 1e-4 absorbs float round-off).
    name
        Argument name used in the error message.

    Returns
    -------
    numpy.ndarray
        float32 (H, W) copy-free view where possible, clipped to [0, 1].
    """
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D grayscale array (H, W), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(
            f"{name} must be float in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
            "scale it first (e.g. window_ct for HU, or divide 8-bit data by 255)"
        )
    return np.clip(arr, 0.0, 1.0)


def clip_unit(out: np.ndarray) -> np.ndarray:
    """A filter's result as float32 in [0, 1]: the output counterpart of :func:`as_image`.

    NaN (a filter dividing 0 by 0) becomes 0; overshoot (ringing, subtraction) is clipped.
    """
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32)


def as_mask(mask: np.ndarray, *, name: str = "mask") -> np.ndarray:
    """Return ``mask`` as a 2-D bool array or raise a clear ``ValueError``."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {arr.shape}")
    if arr.dtype != bool:
        uniq = np.unique(arr)
        if not np.isin(uniq, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1), got values {uniq[:5]}...")
        arr = arr.astype(bool)
    return arr


def odd_size(size: int, *, name: str = "size", minimum: int = 1) -> int:
    """Validate a filter window side length: an odd int >= ``minimum``."""
    if int(size) != size or size < minimum or size % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= {minimum}, got {size!r}")
    return int(size)


def positive(value: float, *, name: str) -> float:
    """Validate a strictly positive finite number."""
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
