"""One slice of a synthetic patient: anatomy and lesions in HU, scanner blur and noise, window."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from kidneyscan.data.phantom.anatomy import (
    KIDNEY_SHAPE,
    Patient,
    kidney_geometry,
    kidney_point,
    perirenal_fat_mm,
    sample_patient,
    tissue_hu,
)
from kidneyscan.data.phantom.canvas import Canvas, deformed_ellipse
from kidneyscan.data.phantom.lesions import draw_lesions, sample_lesions
from kidneyscan.data.phantom.sites import CLASSES, PHASES, SiteProfile
from kidneyscan.data.windows import CT_KIDNEY_WINDOW

#: Soft-tissue window of the public CT-KIDNEY images.
WINDOW_LEVEL = CT_KIDNEY_WINDOW.level
WINDOW_WIDTH = CT_KIDNEY_WINDOW.width


@dataclass
class PhantomSlice:
    """One rendered slice.

    Attributes
    ----------
    hu : ndarray
        float32 (S, S) HU image with blur and quantum noise, what the scanner gives.
    clean_hu : ndarray
        float32 (S, S) HU image before blur and noise (ground truth).
    image : ndarray
        ``hu`` in the soft-tissue window W400/L40, float32 (S, S) in [0, 1].
    clean : ndarray
        ``clean_hu`` in the same window, float32 (S, S) in [0, 1].
    masks : dict of str to ndarray
        Boolean (S, S) masks ``body``, ``kidney`` (both kidneys, lesion-free outline) and
        ``lesion`` (empty for Normal).
    meta : dict
        Lesion type, count, size (mm), mean HU, contrast phase, noise, blur, confounders...
    """

    hu: np.ndarray
    clean_hu: np.ndarray
    image: np.ndarray
    clean: np.ndarray
    masks: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


def window(hu: np.ndarray, level: float = WINDOW_LEVEL, width: float = WINDOW_WIDTH) -> np.ndarray:
    """Map HU to float32 [0, 1] with a linear window (default soft tissue W400/L40)."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    lo = level - width / 2.0
    # Multiplying by 1 / width (not Window.apply's division) keeps the written phantoms
    # byte-identical to those generated before the window type existed.
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


def _render(p: Patient, level: float, rng: np.random.Generator, image_size: int) -> PhantomSlice:
    site = p.site
    # small outputs are painted at >= 256 px and area-averaged: thin skin, table and vessel
    # walls then get partial volume instead of full-HU single-pixel lines
    ss = max(1, min(4, 256 // image_size))
    cv = Canvas(image_size * ss, site.fov_mm)
    size = cv.size
    t = tissue_hu(p)
    tex = np.random.default_rng([p.texture_seed, int(level * 1000)])
    W, H, cy = p.width / 2, p.height / 2, p.cy
    bone_scale = 0.9 + 0.1 * site.contrast_scale

    # ---- table under the patient: a curved cradle, a base plate and two side rails ----------
    table_y = cy + 0.9 * H + float(tex.uniform(3, 10))
    R = 0.8 * site.fov_mm
    tab = np.linspace(-0.55, 0.55, 48)
    # a cradle: lowest under the patient's back, rising towards the sides
    arc = np.stack([R * np.sin(tab), table_y - R * (1 - np.cos(tab))], axis=1)
    cv.line(arc, 260.0, 2.0)
    cv.line(arc + [0.0, 0.06 * site.fov_mm], 120.0, 1.4)
    for s in (-1.0, 1.0):
        x0 = s * R * math.sin(0.55)
        y0 = table_y - R * (1 - math.cos(0.55))
        rail = np.array([[x0 * 1.02, y0 + 0.03 * R], [x0 * 0.8, y0 + 0.2 * R]])
        cv.line(rail + [0.0, 0.012 * site.fov_mm], 200.0, 1.4)

    # ---- body: skin, subcutaneous fat, abdominal wall muscle, visceral fat -----------------
    body = deformed_ellipse(0.0, cy, W, H, 0.0, p.body_shape)
    # the back is flattened where the patient lies on the table
    flat = cy + 0.8 * H
    body[:, 1] = np.where(body[:, 1] > flat, flat + 0.35 * (body[:, 1] - flat), body[:, 1])
    body_mask = np.zeros((size, size), np.uint8)
    cv.fill(body, 1, body_mask)
    cv.fill(body, t["fat"])
    cv.line(body, t["skin"], 1.2, closed=True)
    centre = np.array([0.0, cy])
    wall_out = centre + (body - centre) * np.array(
        [(W - p.fat) / W, (H - 0.7 * p.fat) / H], dtype=np.float64
    )
    cv.fill(wall_out, t["muscle"])
    # wall thickness varies: rectus sheath in front (~12 mm), thin obliques at the flanks
    radial = wall_out - centre
    dist = np.hypot(radial[:, 0], radial[:, 1])
    front = np.clip(-radial[:, 1] / dist, 0.0, 1.0)  # 1 straight anterior
    thick = 4.0 + 8.0 * front**2
    cav_poly = centre + radial * (1.0 - thick / dist)[:, None]
    cavity = np.zeros((size, size), np.uint8)
    cv.fill(cav_poly, 1, cavity)
    inner = np.full((size, size), t["vfat"], np.float32)
    # visceral fat is not flat: small vessels and strands
    for _ in range(int(tex.integers(15, 40))):  # mesenteric vessels: tiny round dots
        vx, vy = tex.uniform(-0.3, 0.3) * p.width, cy + tex.uniform(-0.4, 0.1) * p.height
        cv.disc(vx, vy, float(tex.uniform(0.8, 2.2)), 0.5 * (t["aorta"] + t["ivc"]), inner)

    # ---- organs inside the peritoneal cavity (painted on `inner`, clipped by the cavity) -----
    lv = level
    # the liver shrinks to its inferior tip towards the lower kidney pole
    liver_s = p.liver_scale * max(0.2, 1.1 - 1.05 * lv)
    liver = deformed_ellipse(
        -0.55 * W, cy + 0.05 * H, 0.62 * W * liver_s, 0.8 * H * liver_s, -25, p.body_shape[:4]
    )
    cv.fill(liver, t["liver"], inner)
    lx, ly = -0.55 * W, cy + 0.05 * H
    lrx, lry = 0.62 * W * liver_s, 0.8 * H * liver_s
    if p.phase != "none":  # enhancing portal / hepatic veins inside the liver
        for _ in range(int(tex.integers(3, 9))):
            rr, th = 0.7 * math.sqrt(tex.random()), tex.uniform(0, 2 * math.pi)
            vx, vy = lx + rr * lrx * math.cos(th), ly + rr * lry * math.sin(th)
            cv.fill(deformed_ellipse(vx, vy, 3.5, 2.2, tex.uniform(0, 180)), t["ivc"] + 20, inner)
    if p.gallbladder and 0.15 < lv < 0.6:
        # fluid-filled gallbladder at the liver's medial edge: a cyst mimic in every class
        gx, gy = lx + 0.75 * lrx, ly - 0.3 * lry
        cv.fill(deformed_ellipse(gx, gy, 16, 12, 30), float(tex.uniform(0, 20)), inner)
    if lv < 0.55:
        spleen_s = (0.55 - lv) / 0.55
        sp = deformed_ellipse(
            0.62 * W, cy + 0.3 * H, 0.28 * W * spleen_s + 4, 0.4 * H * spleen_s + 4, 50
        )
        cv.fill(sp, t["spleen"], inner)
    if lv < 0.45:  # stomach with an air-fluid level at upper slices
        st = deformed_ellipse(0.3 * W, cy - 0.45 * H, 0.28 * W, 0.22 * H, 10, p.body_shape[2:6])
        cv.fill(st, t["bowel_wall"], inner)
        st_in = deformed_ellipse(
            0.3 * W, cy - 0.45 * H, 0.28 * W - 4, 0.22 * H - 4, 10, p.body_shape[2:6]
        )
        stomach = np.zeros((size, size), np.uint8)
        cv.fill(st_in, 1, stomach)
        gas_row = int((cy - 0.5 * H) / cv.px_mm + size / 2)
        fill_hu = 250.0 if p.bowel_contrast else 12.0
        inner[stomach > 0] = fill_hu
        rows = slice(0, max(0, gas_row))
        inner[rows][stomach[rows] > 0] = -950.0
    # pancreas: lobulated band in front of the vessels
    if 0.2 < lv < 0.65:
        pan = deformed_ellipse(
            0.1 * W, p.spine_y - 0.5 * H, 0.35 * W, 0.07 * H, -12, (0.0, 0.0, 0.1, 1.0, 0.12, 2.0)
        )
        cv.fill(pan, t["pancreas"], inner)
    # bowel loops: wall then content (gas, fluid, feces, oral contrast)
    for x, y, r, aspect, angle, content in p.bowel:
        # loops drift between neighbouring slices
        x_, y_ = x + 30 * math.sin(7 * lv + x), y + 30 * math.cos(5 * lv + y)
        cv.fill(deformed_ellipse(x_, y_, r, r * aspect, angle), t["bowel_wall"], inner)
        rr = r - 2.0
        lumen = deformed_ellipse(x_, y_, rr, rr * aspect, angle)
        if content == "gas":
            cv.fill(lumen, -950.0, inner)
        elif content == "fluid":
            cv.fill(lumen, 15.0, inner)
        elif content == "contrast":
            cv.fill(lumen, float(tex.uniform(250, 650)) * p.enh, inner)
        elif content == "feces":  # mottled: soft matter with gas bubbles
            cv.fill(lumen, -40.0, inner)
            for _ in range(int(rr // 2) + 2):
                dx, dy = tex.uniform(-0.6, 0.6, 2) * rr
                cv.disc(x_ + dx, y_ + dy * aspect, rr * float(tex.uniform(0.1, 0.3)), -900.0, inner)
    # phleboliths (extra-renal calcified foci: a classic stone mimic in every class)
    n_phleb = 0
    for x, y, r, value in p.phleboliths:
        cv.disc(x, y, r, value, inner)
        n_phleb += 1

    hu = cv.hu
    cv2.copyTo(inner, cavity, hu)  # one pass, uint8 mask

    # ---- retroperitoneum: spine, muscles, great vessels, kidneys ----------------------------
    sy = p.spine_y
    vr = 19.0 * (0.9 + 0.1 * p.width / 300)
    # psoas grows towards the lower pole
    ps = 0.5 + 0.8 * lv
    for s in (-1.0, 1.0):
        cv.fill(
            deformed_ellipse(s * (vr + 3 + 6 * ps), sy - 3, 7 * ps + 4, 9 * ps + 5, s * 30),
            t["muscle"],
        )
        # paraspinal muscles behind the transverse processes
        cv.fill(deformed_ellipse(s * 27, sy + 33, 22, 17, s * 10), t["muscle"])
        cv.fill(
            deformed_ellipse(s * 52, sy + 14, 10, 17, s * 40), t["muscle"]
        )  # quadratus lumborum
    # perirenal fat (inside Gerota's fascia): the dark rim that outlines a kidney on real CT,
    # even unenhanced, where kidney (30-40 HU) and muscle (~50 HU) are nearly isodense. Painted
    # over the muscles it abuts, under the spine, vessels and kidney painted next.
    kidneys = kidney_geometry(p, lv)
    rim = perirenal_fat_mm(p)
    for _, _, (kx, ky, a, b, ang) in kidneys:
        cv.fill(deformed_ellipse(kx, ky, a + rim, b + rim, ang, KIDNEY_SHAPE), t["vfat"])
    # vertebra: cortical shell, cancellous core, canal, pedicles, transverse and spinous process
    cv.fill(deformed_ellipse(0, sy, vr, vr * 0.85), 900.0 * bone_scale)
    cv.fill(deformed_ellipse(0, sy, vr - 2.2, vr * 0.85 - 2.2), p.cancellous_hu * bone_scale)
    post = 900.0 * bone_scale
    for s in (-1.0, 1.0):  # pedicles and laminae ring the canal; transverse processes
        cv.line(np.array([[s * 8, sy + 12], [s * 11, sy + 22], [s * 3, sy + 32]]), post, 3)
        cv.line(np.array([[s * 10, sy + 18], [s * 26, sy + 19]]), post, 3)
    cv.fill(deformed_ellipse(0, sy + 40, 3, 9), post)  # spinous process
    cv.fill(deformed_ellipse(0, sy + 22, 8, 7), 10.0)  # spinal canal (CSF)
    # aorta (patient left = image right, anterior to spine) and IVC (patient right)
    # anterior and to the left of the vertebral body, touching it, as at the renal hilum
    ar = 11.0 * float(0.9 + 0.2 * (p.width > 300))
    ax, ay = 0.8 * vr + 2, sy - 0.85 * vr - 0.6 * ar
    cv.fill(deformed_ellipse(ax, ay, ar, ar), t["aorta"])
    calcified = bool(p.aortic_calc)
    for start, extent in p.aortic_calc:
        rad = np.radians(np.linspace(start, start + extent, 12))
        cv.line(np.stack([ax + ar * np.cos(rad), ay + ar * np.sin(rad)], 1), 700 * bone_scale, 1.5)
    cv.fill(deformed_ellipse(-ax - 14, ay + 2, 14, 9, 0), t["ivc"])

    # kidneys: cortex, medulla (pyramids), sinus fat, pelvis, renal vein
    kidney_mask = np.zeros((size, size), np.uint8)
    lesion_mask = np.zeros((size, size), np.uint8)
    frames = {}
    for s, klev, (kx, ky, a, b, ang) in kidneys:
        frames[s] = (kx, ky, a, b, ang)
        outline = deformed_ellipse(kx, ky, a, b, ang, KIDNEY_SHAPE)
        cv.fill(outline, 1, kidney_mask)
        cv.fill(outline, t["cortex"])
        for j in range(5):  # medullary pyramids on the lateral side, pointing to the sinus
            phi = math.radians(s * 90 + 180 + (j - 2) * 38)
            mx, my = kidney_point(frames[s], 0.55 * math.cos(phi), 0.55 * math.sin(phi))
            cv.fill(
                deformed_ellipse(mx, my, 0.2 * a, 0.13 * a, ang + math.degrees(phi)), t["medulla"]
            )
        if abs(klev - 0.5) < 0.22:  # hilar slices: sinus fat, pelvis and renal vein
            hx, hy = kidney_point(frames[s], 0.0, 0.6 * s)
            cv.fill(deformed_ellipse(hx, hy, 0.42 * a, 0.5 * b, ang), t["vfat"])
            px_, py_ = kidney_point(frames[s], 0.0, 0.55 * s)
            cv.fill(deformed_ellipse(px_, py_, 0.24 * a, 0.28 * b, ang), 8.0)
            target = (-ax - 14, ay + 2) if s < 0 else (ax, ay)
            cv.line(np.array([[hx, hy], target]), t["ivc"], 4.5)

    # ---- ribs at upper slices, outside the cavity -----------------------------------------
    if lv < 0.7:
        for k in range(5):
            th = math.radians(25 + 28 * k)
            for s in (-1.0, 1.0):
                rx_ = s * (W - p.fat - 6) * math.cos(th) * 1.0
                ry_ = cy + (H - 0.7 * p.fat - 6) * math.sin(th) * 0.9
                if abs(rx_) < 0.3 * W:
                    continue
                cv.fill(deformed_ellipse(rx_, ry_, 5, 3, math.degrees(th) + 90), 700 * bone_scale)

    # ---- lesions (painted last so they replace parenchyma) ---------------------------------
    les_meta = draw_lesions(p, cv, frames, lv, tex, t, lesion_mask)

    # ---- scanner: PSF blur (partial volume), detector pixels, then quantum noise -----------
    sigma_px = site.blur_mm / cv.px_mm
    blurred = cv2.GaussianBlur(hu, (0, 0), sigma_px) if sigma_px > 0.25 else None
    out_size = (image_size, image_size)
    if ss > 1:
        clean_hu = cv2.resize(hu, out_size, interpolation=cv2.INTER_AREA)
        noisy = (
            clean_hu.copy()
            if blurred is None
            else cv2.resize(blurred, out_size, interpolation=cv2.INTER_AREA)
        )
        masks = {
            "body": _downsample_mask(body_mask, image_size),
            "kidney": _downsample_mask(kidney_mask, image_size),
            "lesion": _downsample_mask(lesion_mask, image_size, keep_any=True),
        }
    else:
        clean_hu = hu.copy()
        noisy = clean_hu.copy() if blurred is None else blurred
        masks = {  # 0/1 uint8 canvases reinterpreted as bool without a copy
            "body": body_mask.view(bool),
            "kidney": kidney_mask.view(bool),
            "lesion": lesion_mask.view(bool),
        }
    noise_sigma = site.noise_sigma_hu * float(np.clip(p.width / 300.0, 0.75, 1.4))
    white = rng.standard_normal(out_size, dtype=np.float32)
    if image_size >= 256:  # reconstruction makes quantum noise slightly correlated
        noise = cv2.GaussianBlur(white, (0, 0), 0.7)
        scale = noise_sigma / 0.408  # 0.408: measured std of unit white noise after that blur
    else:
        noise, scale = white, noise_sigma
    noisy += np.multiply(noise, np.float32(scale), out=noise)

    meta: dict[str, Any] = {
        "class_name": p.class_name,
        "site": site.name,
        "slice_level": round(float(lv), 4),
        "contrast_phase": p.phase,
        "contrast_scale": round(p.enh, 4),
        "noise_sigma_hu": round(noise_sigma, 3),
        "blur_mm": site.blur_mm,
        "patient_width_mm": round(p.width, 1),
        "fov_mm": site.fov_mm,
        "pixel_mm": round(site.fov_mm / image_size, 4),
        "bowel_contrast": p.bowel_contrast,
        "n_phleboliths": n_phleb,
        "vessel_calcification": calcified,
        **les_meta,
    }
    return PhantomSlice(
        hu=noisy,
        clean_hu=clean_hu,
        image=window(noisy),
        clean=window(clean_hu),
        masks=masks,
        meta=meta,
    )


def _downsample_mask(mask: np.ndarray, size: int, keep_any: bool = False) -> np.ndarray:
    """Area-average a 0/1 mask to ``size``; pixels at least half covered are in.

    With ``keep_any`` a structure smaller than half a pixel keeps its most covered pixel, so
    a tiny stone still has a non-empty lesion mask.
    """
    cover = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    out = cover >= 0.5
    if keep_any and not out.any() and cover.max() > 0:
        out = cover == cover.max()
    return out


def _sample_case(
    rng: np.random.Generator,
    class_name: str,
    site: SiteProfile,
    level: float,
    width_u: float | None = None,
) -> Patient:
    """A patient with its lesions; anatomy first, then lesions, from the one ``rng`` stream."""
    patient = sample_patient(rng, class_name, site, level, width_u)
    patient.lesions = sample_lesions(rng, class_name, patient, level)
    return patient


def _check_class(class_name: str) -> str:
    lowered = {c.lower(): c for c in CLASSES}
    key = str(class_name).strip().lower()
    if key not in lowered:
        raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(CLASSES)}")
    return lowered[key]


def render_slice(
    rng: np.random.Generator,
    class_name: str,
    site: SiteProfile,
    image_size: int = 512,
    slice_level: float | None = None,
) -> PhantomSlice:
    """Render one synthetic axial CT slice at kidney level.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness (patient, lesion, noise): same state, same slice.
    class_name : str
        ``Cyst``, ``Normal``, ``Stone`` or ``Tumor`` (case-insensitive).
    site : SiteProfile
        Scanner / population of the hospital (see :func:`make_sites`).
    image_size : int
        Output side in pixels (>= 32); anatomy is drawn in mm so any size is a true rendering.
    slice_level : float or None
        Position from the upper (0) to the lower (1) kidney pole; random when None.

    Returns
    -------
    PhantomSlice
        HU images, windowed images in [0, 1], boolean masks and metadata.
    """
    name = _check_class(class_name)
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    if slice_level is None:
        slice_level = float(rng.uniform(0.1, 0.9))
    if not 0.0 <= slice_level <= 1.0:
        raise ValueError(f"slice_level must be in [0, 1], got {slice_level}")
    patient = _sample_case(rng, name, site, slice_level)
    return _render(patient, slice_level, rng, image_size)


def iter_patient_slices(
    job_seed: Sequence[int],
    class_name: str,
    site: SiteProfile,
    n_slices: int,
    image_size: int,
    phase: str | None = None,
    level_u: float | None = None,
    width_u: float | None = None,
) -> Iterator[PhantomSlice]:
    """Yield ``n_slices`` neighbouring slices (3-5 mm apart) of one synthetic patient.

    The anatomy, contrast phase and lesion are shared; noise differs per slice. ``phase``
    (``none``, ``arterial``, ``portal``) overrides the site's random draw; ``level_u`` and
    ``width_u`` in [0, 1) place the slice block and the patient width within their ranges
    (random when None).
    """
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    for name, u in (("level_u", level_u), ("width_u", width_u)):
        if u is not None and not 0.0 <= u <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {u}")
    rng = np.random.default_rng(list(job_seed))
    step = float(rng.uniform(0.03, 0.045))  # 3-5 mm over a ~110 mm kidney
    lo, hi = 0.12, 0.88 - step * (n_slices - 1)
    start = lo + (hi - lo) * (float(rng.random()) if level_u is None else level_u)
    centre = start + step * (n_slices - 1) / 2
    patient = _sample_case(rng, _check_class(class_name), site, centre, width_u)
    if phase is not None:
        patient.phase = phase
    for i in range(n_slices):
        yield _render(patient, start + i * step, rng, image_size)
