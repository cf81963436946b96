"""Drawing in millimetres: OpenCV fills on float32 HU canvases with sub-pixel outlines."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

SHIFT = 4  # fixed-point bits for OpenCV drawing: sub-pixel accurate outlines at 64 px


SCALE = float(1 << SHIFT)


class Canvas:
    """HU canvas plus the mm -> pixel mapping."""

    def __init__(self, size: int, fov_mm: float) -> None:
        self.size = size
        self.fov = fov_mm
        self.px_mm = fov_mm / size
        self.hu = np.full((size, size), -1000.0, dtype=np.float32)

    def pts(self, xy: np.ndarray) -> np.ndarray:
        """mm (N, 2) -> fixed-point pixel coordinates for OpenCV."""
        p = (xy / self.px_mm + self.size / 2.0 - 0.5) * SCALE
        return np.round(p).astype(np.int32).reshape(-1, 1, 2)

    def fill(self, xy: np.ndarray, value: float, target: np.ndarray | None = None) -> None:
        """Fill the polygon ``xy`` (mm) with ``value`` on the HU canvas or on ``target``."""
        cv2.fillPoly(
            self.hu if target is None else target, [self.pts(xy)], float(value), cv2.LINE_8, SHIFT
        )

    def line(self, xy: np.ndarray, value: float, thick_mm: float, closed: bool = False) -> None:
        """Draw the polyline ``xy`` (mm), ``thick_mm`` wide, on the HU canvas."""
        t = max(1, int(round(thick_mm / self.px_mm)))
        cv2.polylines(self.hu, [self.pts(xy)], closed, float(value), t, cv2.LINE_8, SHIFT)

    def disc(self, x: float, y: float, r_mm: float, value: float, target: np.ndarray) -> None:
        """Fill a disc of radius ``r_mm`` centred at (``x``, ``y``) mm on ``target``."""
        c = self.pts(np.array([[x, y]], dtype=np.float64))[0, 0]
        r = int(round(r_mm / self.px_mm * SCALE))
        cv2.circle(target, (int(c[0]), int(c[1])), r, float(value), -1, cv2.LINE_8, SHIFT)


_THETA = np.linspace(0.0, 2 * math.pi, 72, endpoint=False)


def deformed_ellipse(
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    angle_deg: float = 0.0,
    harmonics: Sequence[float] = (),
    theta: np.ndarray = _THETA,
) -> np.ndarray:
    """Polygon (N, 2) in mm: an ellipse with optional smooth radial deformations."""
    r = np.ones_like(theta)
    for i in range(0, len(harmonics), 2):
        k = i // 2 + 2
        r = r + harmonics[i] * np.cos(k * theta + harmonics[i + 1])
    x = rx * r * np.cos(theta)
    y = ry * r * np.sin(theta)
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)
