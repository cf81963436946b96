"""Mathematical morphology on grayscale images and bool masks (scikit-image).

Grayscale inputs are float32 (H, W) in [0, 1] and stay so; bool masks stay bool. The
structuring element is chosen by ``shape`` and ``radius`` (see :func:`footprint`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from skimage import morphology as skmorph

from kidneyscan.preprocess._checks import as_image
from kidneyscan.preprocess.pipeline import register_step

Shape = Literal["disk", "square", "diamond", "cross"]


def footprint(shape: Shape = "disk", radius: int = 1) -> np.ndarray:
    """Structuring element of side ``2 * radius + 1``.

    Parameters
    ----------
    shape
        ``"disk"``, ``"square"``, ``"diamond"`` or ``"cross"`` (a plus sign).
    radius
        Integer >= 1.
    """
    if int(radius) != radius or radius < 1:
        raise ValueError(f"radius must be an integer >= 1, got {radius!r}")
    r = int(radius)
    if shape == "disk":
        return skmorph.disk(r).astype(bool)
    if shape == "square":
        return skmorph.footprint_rectangle((2 * r + 1, 2 * r + 1)).astype(bool)
    if shape == "diamond":
        return skmorph.diamond(r).astype(bool)
    if shape == "cross":
        fp = np.zeros((2 * r + 1, 2 * r + 1), dtype=bool)
        fp[r, :] = True
        fp[:, r] = True
        return fp
    raise ValueError(f"unknown footprint shape {shape!r}; use disk, square, diamond or cross")


def _prep(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype == bool:
        if arr.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {arr.shape}")
        return arr
    return as_image(arr)


@register_step("dilate")
def dilate(image: np.ndarray, *, shape: Shape = "disk", radius: int = 1) -> np.ndarray:
    """Dilation (local maximum over the footprint); grows bright regions / masks."""
    img = _prep(image)
    return skmorph.dilation(img, footprint(shape, radius))


@register_step("erode")
def erode(image: np.ndarray, *, shape: Shape = "disk", radius: int = 1) -> np.ndarray:
    """Erosion (local minimum over the footprint); shrinks bright regions / masks."""
    img = _prep(image)
    return skmorph.erosion(img, footprint(shape, radius))


@register_step("open")
def opening(image: np.ndarray, *, shape: Shape = "disk", radius: int = 1) -> np.ndarray:
    """Opening (erosion then dilation): removes bright specks smaller than the footprint."""
    img = _prep(image)
    return skmorph.opening(img, footprint(shape, radius))


@register_step("close")
def closing(image: np.ndarray, *, shape: Shape = "disk", radius: int = 1) -> np.ndarray:
    """Closing (dilation then erosion): fills dark gaps smaller than the footprint."""
    img = _prep(image)
    return skmorph.closing(img, footprint(shape, radius))
