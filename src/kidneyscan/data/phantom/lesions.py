"""Lesions of the Cyst, Stone and Tumor classes: where they sit, how big, how dense, how drawn."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from kidneyscan.data.phantom.anatomy import (
    KIDNEY_DY,
    Lesion,
    Patient,
    kidney_point,
    random_harmonics,
)
from kidneyscan.data.phantom.canvas import SCALE, SHIFT, Canvas, deformed_ellipse
from kidneyscan.data.phantom.sites import CLASSES

#: Lesion diameters (mm) drawn by :func:`sample_lesions` (the issue's facts for the public data).
CYST_DIAMETER_MM = (10.0, 80.0)
TUMOR_DIAMETER_MM = (20.0, 120.0)
STONE_DIAMETER_MM = (2.0, 20.0)
#: Share of Stone patients scanned without contrast (stone protocols are unenhanced).
STONE_UNENHANCED = 0.8


def sample_lesions(
    rng: np.random.Generator, class_name: str, patient: Patient, level: float
) -> list[Lesion]:
    """Draw the lesions of a ``class_name`` patient centred at slice ``level`` (none for Normal)."""
    side = int(rng.choice([-1, 1]))
    if class_name == "Normal":
        return []
    if class_name == "Cyst":
        # 1-8 cm diameter, log-uniform: the public data's cysts are mostly several cm
        lo, hi = CYST_DIAMETER_MM
        radius = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) / 2
        exophytic = rng.random() < 0.65
        ang = float(rng.uniform(0, 2 * math.pi))
        dist = float(rng.uniform(0.75, 1.05)) if exophytic else float(rng.uniform(0.2, 0.6))
        return [
            Lesion(
                "cyst",
                side,
                dist * math.cos(ang),
                dist * math.sin(ang),
                radius,
                float(rng.uniform(0, 20)),
                level,
                max(radius / 110.0, 0.06),
            )
        ]
    if class_name == "Stone":
        n = 1 + int(rng.poisson(0.6))
        out = []
        for _ in range(n):
            # sizes skew small like real stones; 2-20 mm diameter
            diameter = float(np.clip(np.exp(rng.normal(np.log(6.0), 0.55)), *STONE_DIAMETER_MM))
            composition = rng.random()
            # uric acid (a quarter) or calcium oxalate
            hu = rng.uniform(300, 500) if composition < 0.25 else rng.uniform(600, 1500)
            out.append(
                Lesion(
                    "stone",
                    side if rng.random() < 0.8 else -side,
                    # renal pelvis and calyces: towards the hilum, anywhere along the long axis
                    float(rng.uniform(-0.45, 0.45)),
                    float(rng.uniform(0.2, 0.6)),
                    diameter / 2.0,
                    float(hu),
                    level,
                    0.2,
                )
            )
        return out
    if class_name == "Tumor":
        # 2-12 cm diameter: masses that bulge out of the kidney and deform its outline
        lo, hi = TUMOR_DIAMETER_MM
        radius = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) / 2
        ang = float(rng.uniform(0, 2 * math.pi))
        dist = float(rng.uniform(0.55, 1.0))
        return [
            Lesion(
                "tumor",
                side,
                dist * math.cos(ang),
                dist * math.sin(ang),
                radius,
                float(rng.uniform(30, 60)),
                level,
                max(radius / 110.0, 0.08),
                necrotic=bool(rng.random() < 0.6 and radius > 12),
                shape=random_harmonics(rng, 7, 0.35),
            )
        ]
    raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(CLASSES)}")


def draw_lesions(
    p: Patient,
    cv: Canvas,
    frames: dict[int, tuple[float, float, float, float, float]],
    level: float,
    tex: np.random.Generator,
    t: dict[str, float],
    lesion_mask: np.ndarray,
) -> dict[str, Any]:
    """Paint the patient's lesions on ``cv.hu`` and ``lesion_mask``; return their metadata."""
    if not p.lesions:
        return {
            "lesion_type": "none",
            "lesion_count": 0,
            "lesion_size_mm": 0.0,
            "lesion_hu": float("nan"),
            "lesion_side": "none",
        }
    sizes: list[float] = []
    hus: list[float] = []
    sides: list[str] = []
    for les in p.lesions:
        side = les.side if les.side in frames else (-les.side if -les.side in frames else None)
        if side is None:  # slice below both kidneys: keep the lesion on the nearest pole
            side = les.side
            frames[side] = (side * p.kidney_dx, p.spine_y + KIDNEY_DY, 14.0, 10.0, 90.0)
        ang = frames[side][4]
        # v > 0 means towards the hilum (medial) whichever kidney holds the lesion
        x, y = kidney_point(frames[side], les.u, les.v * side)
        # cross-section of a 3-D lesion; every slice of a lesion patient still shows it
        d = (level - les.level) / max(les.extent, 1e-3)
        r = les.radius_mm * max(math.sqrt(max(0.0, 1.0 - d * d)), 0.6)
        if les.kind != "stone":  # stones get exact partial volume instead (_draw_stone)
            r = max(r, 0.5 * cv.px_mm)
        if les.kind == "stone":
            _draw_stone(cv, x, y, r, les.hu, lesion_mask)
            value = les.hu  # the stone's material HU; small stones are diluted in their pixels
        elif les.kind == "cyst":  # homogeneous fluid, sharp wall
            outline = deformed_ellipse(x, y, r, r * 0.95, ang)
            cv.fill(outline, 1, lesion_mask)
            cv.fill(outline, les.hu)
            value = les.hu
        else:  # tumor: heterogeneous solid mass, irregular margin, optional necrotic centre
            local = np.zeros_like(lesion_mask)
            cv.fill(deformed_ellipse(x, y, r, r * 0.9, ang, les.shape), 1, local)
            enh = {"none": 0.0, "arterial": 70.0, "portal": 50.0}[p.phase] * p.enh
            ys, xs = np.nonzero(local)
            # heterogeneity on two scales: patchy enhancement and fine grain
            y0, x0 = int(ys.min()), int(xs.min())
            h, w = int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1
            cells = tex.standard_normal((5, 5), dtype=np.float32)
            patch = cv2.resize(cells, (w, h), interpolation=cv2.INTER_CUBIC)[ys - y0, xs - x0]
            grain = tex.normal(0, 4, ys.size).astype(np.float32)
            # heterogeneous on every phase (haemorrhage, fibrosis), more so where it enhances
            vals = les.hu + enh * (0.7 + 0.6 * patch) + 18.0 * patch + grain
            if les.necrotic:
                nec = np.zeros_like(local)
                cv.fill(deformed_ellipse(x, y, 0.45 * r, 0.4 * r, ang, les.shape[4:]), 1, nec)
                vals = np.where(nec[ys, xs] > 0, 15.0 + 0.3 * grain, vals)
            cv.hu[ys, xs] = vals
            value = float(np.mean(vals)) if vals.size else les.hu + enh
            lesion_mask |= local
        sizes.append(2.0 * r)
        hus.append(value)
        sides.append("right" if side < 0 else "left")  # patient side (image left = right)
    return {
        "lesion_type": p.lesions[0].kind,
        "lesion_count": len(p.lesions),
        "lesion_size_mm": round(float(max(sizes)), 2),
        "lesion_hu": round(float(np.mean(hus)), 1),
        "lesion_side": "both" if len(set(sides)) > 1 else sides[0],
    }


def _draw_stone(cv: Canvas, x: float, y: float, r_mm: float, hu: float, mask: np.ndarray) -> None:
    """Paint a round stone with partial volume (pixel coverage from a supersampled disc).

    A 2 mm stone covers a fraction of a 6 mm pixel at 64 px: the pixel gets the
    area-weighted mix of stone and background HU, as a CT detector would report. ``mask``
    marks pixels at least half covered, and always the most covered one.
    """
    size = cv.size
    cx = x / cv.px_mm + size / 2.0 - 0.5
    cy = y / cv.px_mm + size / 2.0 - 0.5
    rp = r_mm / cv.px_mm
    ss = int(min(32, max(4, math.ceil(8.0 / max(rp, 0.25)))))  # >= 8 sub-pixels per radius
    x0, y0 = max(int(math.floor(cx - rp)) - 1, 0), max(int(math.floor(cy - rp)) - 1, 0)
    x1, y1 = min(int(math.ceil(cx + rp)) + 2, size), min(int(math.ceil(cy + rp)) + 2, size)
    if x1 <= x0 or y1 <= y0:
        return
    fine = np.zeros(((y1 - y0) * ss, (x1 - x0) * ss), np.float32)
    # fine pixel k is centred on coarse coordinate x0 - 0.5 + (k + 0.5) / ss
    centre = (
        int(round(((cx - x0 + 0.5) * ss - 0.5) * SCALE)),
        int(round(((cy - y0 + 0.5) * ss - 0.5) * SCALE)),
    )
    cv2.circle(fine, centre, int(round(rp * ss * SCALE)), 1.0, -1, cv2.LINE_8, SHIFT)
    cover = cv2.resize(fine, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    if cover.max() <= 0:  # smaller than a sub-sample: give its area to the nearest pixel
        cover[min(int(round(cy)) - y0, y1 - y0 - 1), min(int(round(cx)) - x0, x1 - x0 - 1)] = min(
            1.0, math.pi * rp * rp
        )
    patch = cv.hu[y0:y1, x0:x1]
    patch += cover * (np.float32(hu) - patch)
    m = cover >= 0.5
    if not m.any():
        m = cover == cover.max()
    mask[y0:y1, x0:x1] |= m.astype(mask.dtype)
