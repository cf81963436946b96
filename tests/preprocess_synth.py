"""Tiny synthetic abdominal CT slices with masks for the preprocess tests.

Deliberately independent of ``kidneyscan.data.phantom`` so these tests do not depend on the
phantom's exact look: an elliptical body (soft tissue) with a fat layer, a bright spine, two
kidneys wrapped in fat, and an optional dark cyst or bright stone, in a W 400 / L 40 window.
"""

from __future__ import annotations

import numpy as np


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def synth_slice(
    size: int = 64, *, lesion: str | None = None, seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return ``(clean float32 (size, size) in [0, 1], {"body", "kidney", "lesion"} masks)``."""
    rng = np.random.default_rng(seed)
    s = size / 64.0
    shape = (size, size)
    jitter = rng.uniform(-1, 1, 4) * s
    body = _ellipse(shape, 32 * s, 32 * s, 22 * s, 28 * s)
    viscera = _ellipse(shape, 31 * s, 32 * s, 17 * s, 23 * s)
    img = np.zeros(shape, np.float32)
    img[body] = 0.15  # subcutaneous fat
    img[viscera] = 0.52  # soft tissue
    fat_l = _ellipse(shape, 38 * s, 18 * s + jitter[0], 7.5 * s, 6.0 * s)
    fat_r = _ellipse(shape, 38 * s, 46 * s + jitter[1], 7.5 * s, 6.0 * s)
    img[fat_l | fat_r] = 0.15  # perirenal fat
    kid_l = _ellipse(shape, 38 * s, 18 * s + jitter[0], 5.5 * s, 3.8 * s + jitter[2] * 0.3)
    kid_r = _ellipse(shape, 38 * s, 46 * s + jitter[1], 5.5 * s, 3.8 * s + jitter[3] * 0.3)
    kidney = kid_l | kid_r
    img[kidney] = 0.6
    spine = _ellipse(shape, 44 * s, 32 * s, 4 * s, 4 * s)
    img[spine] = 0.95
    lesion_mask = np.zeros(shape, bool)
    if lesion == "cyst":
        lesion_mask = _ellipse(shape, 38 * s, 18 * s + jitter[0], 2.5 * s, 2.2 * s)
        img[lesion_mask] = 0.42
    elif lesion == "stone":
        lesion_mask = _ellipse(shape, 38 * s, 46 * s + jitter[1], 1.2 * s, 1.2 * s)
        img[lesion_mask] = 1.0
    elif lesion is not None:
        raise ValueError(lesion)
    return img, {"body": body, "kidney": kidney, "lesion": lesion_mask}
