"""Kidney-mask pooling of cached feature maps, for the probe benchmarks.

The question it answers: do the frozen CT features see the lesions when the pooling looks at
the kidneys instead of the whole kidney band? The kidney mask is found on the full slice by
:func:`kidneyscan.preprocess.anatomy.segment_kidneys_anatomy` (the anatomy segmentation of
the DIP suite, no ground truth), cropped with the ROI box the feature cache stored for the
slice, and area-resized to the feature grid; each cell's weight is the kidney fraction of its
pixels. Where no kidney is found the whole-map mean stands in (counted and reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from kidneyscan.data.datasets import Sample, load_image
from kidneyscan.preprocess.anatomy import segment_kidneys_anatomy

_MASKS: dict[str, np.ndarray] = {}


def kidney_mask(path: str) -> np.ndarray:
    """The anatomy kidney mask of one slice (float32 0/1, full size; memoised per run)."""
    if path not in _MASKS:
        _MASKS[path] = segment_kidneys_anatomy(load_image(path)).astype(np.float32)
    return _MASKS[path]


def kidney_weights(
    samples: Sequence[Sample], rois: Sequence[dict[str, Any]], grid: tuple[int, int]
) -> np.ndarray:
    """Per-cell kidney fraction ``(N, h, w)`` of each slice's ROI crop on the feature grid."""
    h, w = grid
    out = np.zeros((len(samples), h, w), np.float32)
    for i, (s, roi) in enumerate(zip(samples, rois, strict=True)):
        m = kidney_mask(str(s.path))
        if roi:
            m = m[roi["top"] : roi["bottom"], roi["left"] : roi["right"]]
        out[i] = cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA)
    return out


def kidney_pooled(fmap: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Kidney-weighted mean ``(N, C)`` of ``fmap`` ``(N, C, h, w)``; whole-map mean where the
    mask is empty."""
    wsum = weights.sum(axis=(1, 2))
    pooled = np.einsum("nchw,nhw->nc", fmap, weights) / np.maximum(wsum, 1e-6)[:, None]
    return np.where(wsum[:, None] > 0, pooled, fmap.mean(axis=(2, 3)))
