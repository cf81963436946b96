"""Kidney region of interest: crop a slice to its kidneys so small findings keep their pixels.

Stones are a few pixels wide once a 512 px slice is shrunk to 128 px; cropping to the kidneys
first keeps several times more pixels on them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from kidneyscan.preprocess._checks import as_image
from kidneyscan.preprocess.pipeline import register_step
from kidneyscan.preprocess.segment import Method, body_mask, segment_kidneys


def _square(
    top: float, left: float, bottom: float, right: float, shape: tuple[int, int], margin: float
) -> tuple[int, int, int, int]:
    h, w = shape
    side = max(bottom - top, right - left)
    side = int(min(h, w, round(side * (1 + 2 * margin))))
    cy, cx = (top + bottom) / 2.0, (left + right) / 2.0
    t = int(np.clip(round(cy - side / 2), 0, h - side))
    lft = int(np.clip(round(cx - side / 2), 0, w - side))
    return t, lft, t + side, lft + side


def body_box(image: np.ndarray, *, margin: float = 0.03) -> tuple[int, int, int, int]:
    """Square box ``(top, left, bottom, right)`` around the body (air and table excluded).

    The whole image when no body is found.
    """
    img = as_image(image)
    body = body_mask(img)
    if not body.any():
        return 0, 0, img.shape[0], img.shape[1]
    rows, cols = np.nonzero(body)
    return _square(rows.min(), cols.min(), rows.max() + 1, cols.max() + 1, img.shape, margin)


@register_step("crop_body")
def crop_body(image: np.ndarray, *, margin: float = 0.03) -> np.ndarray:
    """Crop to a square around the body, dropping air and the scanner table.

    Robust on real CT-KIDNEY slices (the body is the largest bright component) and a
    1.2-1.5x zoom for typical slices. Returns the crop, not resized.
    """
    img = as_image(image)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    t, lft, b, r = body_box(img, margin=margin)
    return np.ascontiguousarray(img[t:b, lft:r])


def kidney_box(
    image: np.ndarray, *, method: Method = "otsu", margin: float = 0.25
) -> tuple[tuple[int, int, int, int], str]:
    """Square box ``(top, left, bottom, right)`` around the kidneys, and how it was found.

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1], soft-tissue window.
    method
        Segmentation method passed to :func:`~kidneyscan.preprocess.segment.segment_kidneys`.
    margin
        Extra border as a fraction of the box side on every side.

    Returns
    -------
    box, source
        ``source`` is ``"kidneys"`` when both kidneys were found, ``"kidney"`` for one,
        ``"body"`` when none was found and the box is :func:`body_box`, or ``"full"`` when
        no body was found either.
    """
    img = as_image(image)
    h, w = img.shape
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    kid = segment_kidneys(img, method=method)
    body = body_mask(img)
    if kid.any():
        rows, cols = np.nonzero(kid)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        n_parts = int(ndi.label(kid)[1])
        # One kidney found: mirror it about the body midline so the crop covers both sides.
        if body.any():
            bcols = np.nonzero(body)[1]
            mid = (bcols.min() + bcols.max()) / 2.0
            mirror_l, mirror_r = int(2 * mid - right), int(2 * mid - left)
            left, right = min(left, mirror_l), max(right, mirror_r)
        source = "kidneys" if n_parts >= 2 else "kidney"
    elif body.any():
        return body_box(img), "body"
    else:
        return (0, 0, h, w), "full"
    return _square(top, left, bottom, right, img.shape, margin), source


@register_step("crop_kidneys")
def crop_kidneys(
    image: np.ndarray, *, method: Method = "otsu", margin: float = 0.25, min_side: float = 0.35
) -> np.ndarray:
    """Crop to a square around the kidneys (see :func:`kidney_box`).

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1].
    method, margin
        See :func:`kidney_box`.
    min_side
        Smallest crop side as a fraction of the image side, so a wrong tiny detection
        cannot zoom onto a few pixels.

    Returns
    -------
    numpy.ndarray
        float32 crop (not resized; the pipeline resizes to ``image_size`` afterwards).
    """
    img = as_image(image)
    (t, lft, b, r), _ = kidney_box(img, method=method, margin=margin)
    h, w = img.shape
    need = int(round(min_side * min(h, w)))
    if b - t < need:
        c = (t + b) // 2
        t = int(np.clip(c - need // 2, 0, h - need))
        b = t + need
    if r - lft < need:
        c = (lft + r) // 2
        lft = int(np.clip(c - need // 2, 0, w - need))
        r = lft + need
    return np.ascontiguousarray(img[t:b, lft:r])
