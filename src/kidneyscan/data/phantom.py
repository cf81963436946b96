"""Synthetic kidney-CT phantom: axial slices at kidney level, built in HU, then windowed.

Each slice is drawn in millimetres on a field of view of about 350-400 mm and rasterised
directly at ``image_size`` (64 px test sets are cheap, 512 px is the default). Anatomy is painted
in Hounsfield units (air, fat, muscle, vertebra, vessels, liver, spleen, bowel, both kidneys with
cortex, medulla, sinus fat and pelvis, the CT table), a lesion is added for the Cyst, Stone and
Tumor classes, then the scanner is simulated (point-spread blur, which also gives partial volume,
and quantum noise) and the soft-tissue window W400/L40 maps HU to [0, 1].

Confounders appear in every class with probabilities that do not depend on the class:
phleboliths, calcified vessel walls, oral contrast in bowel, slice level, patient size, noise
and the contrast phase. :func:`generate_dataset` writes the public CT-KIDNEY layout plus masks,
noise-free ground truth and a metadata CSV; each synthetic patient contributes 1-4 neighbouring
slices with consecutive file indices, like the real data's leakage trap.

HU values follow ``DESIGN.md`` ("Facts for the synthetic kidney-CT phantom").
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

#: Class names in the order of the CT-KIDNEY ``target`` codes; equal to
#: ``kidneyscan.data.datasets.CLASSES`` (checked by the tests).
CLASSES: tuple[str, ...] = ("Cyst", "Normal", "Stone", "Tumor")

#: Soft-tissue window of the public CT-KIDNEY images.
WINDOW_LEVEL = 40.0
WINDOW_WIDTH = 400.0

#: Columns of ``phantom_metadata.csv``.
METADATA_COLUMNS: tuple[str, ...] = (
    "image_id",
    "path",
    "Class",
    "target",
    "site",
    "patient_id",
    "slice_index",
    "slice_level",
    "lesion_type",
    "lesion_count",
    "lesion_size_mm",
    "lesion_hu",
    "lesion_side",
    "noise_sigma_hu",
    "blur_mm",
    "contrast_phase",
    "contrast_scale",
    "patient_width_mm",
    "fov_mm",
    "pixel_mm",
    "bowel_contrast",
    "n_phleboliths",
    "vessel_calcification",
)

_PHASES = ("none", "arterial", "portal")
#: Chance that the file numbering jumps (by 20-200) before a patient, as between scan series.
SERIES_BREAK_PROB = 0.1
#: Kidney centre relative to the vertebral body's centre (mm, + is posterior).
KIDNEY_DY = -6.0
_SHIFT = 4  # fixed-point bits for OpenCV drawing: sub-pixel accurate outlines at 64 px
_SCALE = float(1 << _SHIFT)


@dataclass(frozen=True)
class SiteProfile:
    """Scanner and population parameters of one synthetic hospital.

    Attributes
    ----------
    name : str
        Site identifier written to the metadata (``site0``, ``site1``...).
    noise_sigma_hu : float
        Quantum noise standard deviation (HU) for a 300 mm wide patient, 8-25.
    blur_mm : float
        Gaussian point-spread sigma in mm (reconstruction kernel / focal spot).
    contrast_prob : float
        Probability that a study is contrast-enhanced (independent of the class).
    arterial_fraction : float
        Share of arterial (corticomedullary) among enhanced studies; the rest are portal-venous.
    contrast_scale : float
        kV-like factor on iodine enhancement and bone HU (lower kV gives brighter iodine).
    bowel_contrast_prob : float
        Probability of positive oral contrast in bowel.
    class_weights : tuple of float
        Relative class mix in :data:`CLASSES` order (normalised by :func:`generate_dataset`).
    patient_width_mm : tuple of float
        Range of patient body widths (lateral, mm).
    fov_mm : float
        Reconstruction field of view (mm) mapped to ``image_size`` pixels.
    share : float
        Relative number of images this site contributes.
    """

    name: str = "site0"
    noise_sigma_hu: float = 14.0
    blur_mm: float = 0.8
    contrast_prob: float = 0.5
    arterial_fraction: float = 0.4
    contrast_scale: float = 1.0
    bowel_contrast_prob: float = 0.15
    class_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    patient_width_mm: tuple[float, float] = (240.0, 340.0)
    fov_mm: float = 380.0
    share: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.noise_sigma_hu <= 100:
            raise ValueError(f"site {self.name}: noise_sigma_hu must be in (0, 100]")
        if not 0 <= self.contrast_prob <= 1 or not 0 <= self.arterial_fraction <= 1:
            raise ValueError(f"site {self.name}: probabilities must be in [0, 1]")
        if len(self.class_weights) != len(CLASSES) or min(self.class_weights) < 0:
            raise ValueError(f"site {self.name}: class_weights needs {len(CLASSES)} values >= 0")
        if sum(self.class_weights) <= 0 or self.share <= 0:
            raise ValueError(f"site {self.name}: class_weights and share must be positive")
        lo, hi = self.patient_width_mm
        if not 150 <= lo <= hi <= 0.95 * self.fov_mm:
            raise ValueError(
                f"site {self.name}: patient_width_mm {self.patient_width_mm} must lie in "
                f"[150, 0.95 * fov_mm = {0.95 * self.fov_mm:.0f}]"
            )


def make_sites(n_sites: int = 1, seed: int = 0) -> list[SiteProfile]:
    """Build ``n_sites`` deterministic hospital profiles that clearly differ (non-IID).

    Noise, blur, kV contrast scale, field of view and patient size are spread evenly over their
    ranges (then shuffled by ``seed``); class mixes come from a Dirichlet draw. The probability
    of a contrast-enhanced study varies only mildly between sites so that, pooled over sites, the
    contrast phase stays a weak cue for the class.

    Parameters
    ----------
    n_sites : int
        Number of hospitals, >= 1. One site gets typical mid-range values and a uniform mix.
    seed : int
        Seed of the site parameters.

    Returns
    -------
    list of SiteProfile
    """
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if n_sites == 1:
        return [SiteProfile()]
    rng = np.random.default_rng([seed, 7103])
    t = np.linspace(0.0, 1.0, n_sites)

    def spread(lo: float, hi: float) -> np.ndarray:
        return lo + (hi - lo) * rng.permutation(t)

    noise = spread(9.0, 24.0)
    blur = spread(0.5, 1.3)
    scale = spread(0.85, 1.25)
    fov = spread(350.0, 400.0)
    width_lo = spread(225.0, 270.0)
    contrast = spread(0.4, 0.6)
    sites = []
    for i in range(n_sites):
        weights = rng.dirichlet(np.full(len(CLASSES), 1.5)) + 0.05
        sites.append(
            SiteProfile(
                name=f"site{i}",
                noise_sigma_hu=round(float(noise[i]), 2),
                blur_mm=round(float(blur[i]), 3),
                contrast_prob=round(float(contrast[i]), 3),
                arterial_fraction=round(float(rng.uniform(0.25, 0.6)), 3),
                contrast_scale=round(float(scale[i]), 3),
                bowel_contrast_prob=round(float(rng.uniform(0.05, 0.3)), 3),
                class_weights=tuple(round(float(w), 4) for w in weights),  # type: ignore[arg-type]
                patient_width_mm=(
                    round(float(width_lo[i]), 1),
                    round(float(min(width_lo[i] + 100.0, 0.92 * fov[i])), 1),
                ),
                fov_mm=round(float(fov[i]), 1),
                share=round(float(rng.uniform(0.7, 1.3)), 3),
            )
        )
    return sites


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
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


# --------------------------------------------------------------------------------------------
# Patient model: what stays the same between the neighbouring slices of one synthetic patient.
# --------------------------------------------------------------------------------------------


@dataclass
class _Lesion:
    kind: str  # cyst | stone | tumor
    side: int  # -1 image-left kidney (patient right), +1 image-right kidney
    u: float  # position in kidney coordinates (fractions of the kidney semi-axes)
    v: float
    radius_mm: float
    hu: float
    level: float  # slice level of its centre
    extent: float  # half-extent along the body axis, in slice-level units
    necrotic: bool = False
    shape: tuple[float, ...] = ()  # radial harmonics for irregular margins


@dataclass
class _Patient:
    class_name: str
    site: SiteProfile
    width: float
    height: float
    cy: float
    fat: float
    phase: str
    enh: float  # iodine enhancement multiplier (site kV x patient)
    kidney_dx: float
    kidney_size: float
    kidney_angle: float
    left_offset: float  # the left kidney usually sits higher than the right
    spine_y: float
    liver_scale: float
    bowel: list[tuple[float, float, float, float, float, str]]  # x, y, r, aspect, angle, content
    fat_hu: float
    gallbladder: bool
    cancellous_hu: float
    bowel_contrast: bool
    phleboliths: list[tuple[float, float, float, float]]  # x, y, r, HU
    aortic_calc: list[tuple[float, float]]  # arc start/extent in degrees
    lesions: list[_Lesion]
    body_shape: tuple[float, ...]
    texture_seed: int


def _harmonics(rng: np.random.Generator, k_max: int, amp: float) -> tuple[float, ...]:
    """Random radial harmonics (amplitude, phase per order 2..k_max) for smooth deformations."""
    out: list[float] = []
    for k in range(2, k_max + 1):
        out += [float(rng.normal(0, amp / k)), float(rng.uniform(0, 2 * math.pi))]
    return tuple(out)


def _sample_phase(rng: np.random.Generator, site: SiteProfile) -> str:
    if rng.random() >= site.contrast_prob:
        return "none"
    return "arterial" if rng.random() < site.arterial_fraction else "portal"


def _sample_patient(
    rng: np.random.Generator,
    class_name: str,
    site: SiteProfile,
    level: float,
    width_u: float | None = None,
) -> _Patient:
    lo, hi = site.patient_width_mm
    width = lo + (hi - lo) * (float(rng.random()) if width_u is None else width_u)
    height = width * float(rng.uniform(0.66, 0.8))
    # larger patients carry more subcutaneous fat
    fat = float(np.clip(rng.normal(8 + 0.12 * (width - 240), 5), 4, 45))
    cy = -0.06 * site.fov_mm + float(rng.normal(0, 6))
    # the vertebral body sits ~5 cm in front of the posterior muscle surface
    spine_y = cy + 0.44 * height - 0.7 * fat - float(rng.uniform(44, 54))
    kidney_size = float(rng.uniform(0.85, 1.15)) * (0.85 + 0.15 * width / 300)
    bowel_contrast = bool(rng.random() < site.bowel_contrast_prob)
    bowel = []
    # small-bowel loops fill the anterior abdomen; colon sits laterally (ascending, descending)
    for _ in range(int(rng.integers(12, 30))):
        x = float(rng.uniform(-0.28, 0.36)) * width
        y = cy + float(rng.uniform(-0.42, 0.08)) * height
        r = float(rng.uniform(7, 16))
        # intraperitoneal: in front of the retroperitoneum (spine, aorta, kidneys)
        y = min(y, spine_y - 38.0 - r)
        content = str(rng.choice(["gas", "fluid", "feces", "wall"], p=[0.25, 0.3, 0.2, 0.25]))
        if bowel_contrast and rng.random() < 0.4:
            content = "contrast"
        bowel.append((x, y, r, float(rng.uniform(0.55, 1.0)), float(rng.uniform(0, 180)), content))
    for s in (-1.0, 1.0):
        x = s * float(rng.uniform(0.32, 0.38)) * width
        y = cy + float(rng.uniform(-0.05, 0.15)) * height
        r = float(rng.uniform(14, 22))
        bowel.append((x, y, r, float(rng.uniform(0.7, 1.0)), float(rng.uniform(0, 180)), "feces"))
    phleb = []
    for _ in range(int(rng.poisson(0.8))):
        x = float(rng.choice([-1, 1])) * float(rng.uniform(0.05, 0.3)) * width
        y = cy + float(rng.uniform(-0.3, 0.1)) * height
        phleb.append((x, y, float(rng.uniform(1.2, 3.0)), float(rng.uniform(250, 900))))
    calc = []
    if rng.random() < 0.35:
        for _ in range(int(rng.integers(1, 4))):
            calc.append((float(rng.uniform(0, 360)), float(rng.uniform(20, 90))))
    phase = _sample_phase(rng, site)
    patient = _Patient(
        class_name=class_name,
        site=site,
        width=width,
        height=height,
        cy=cy,
        fat=fat,
        phase=phase,
        enh=site.contrast_scale * float(rng.uniform(0.85, 1.15)),
        # kidney centres 6-8 cm from the midline; fat, not kidney, widens larger patients
        kidney_dx=float(rng.uniform(60, 78)) * (0.9 + 0.1 * width / 300),
        kidney_size=kidney_size,
        kidney_angle=float(rng.uniform(20, 45)),
        left_offset=float(rng.uniform(0.0, 0.15)),
        spine_y=spine_y,
        liver_scale=float(rng.uniform(0.8, 1.15)),
        bowel=bowel,
        fat_hu=float(rng.uniform(-145, -115)),  # real CT-KIDNEY fat peaks near -130 HU
        gallbladder=bool(rng.random() < 0.6),
        cancellous_hu=float(rng.uniform(120, 240)),  # lower in osteopenic patients
        bowel_contrast=bowel_contrast,
        phleboliths=phleb,
        aortic_calc=calc,
        lesions=[],
        body_shape=_harmonics(rng, 5, 0.06),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )
    patient.lesions = _sample_lesions(rng, class_name, patient, level)
    return patient


def _sample_lesions(
    rng: np.random.Generator, class_name: str, patient: _Patient, level: float
) -> list[_Lesion]:
    side = int(rng.choice([-1, 1]))
    if class_name == "Normal":
        return []
    if class_name == "Cyst":
        radius = float(np.exp(rng.uniform(np.log(2.5), np.log(30.0))))
        exophytic = rng.random() < 0.65
        ang = float(rng.uniform(0, 2 * math.pi))
        dist = float(rng.uniform(0.75, 1.05)) if exophytic else float(rng.uniform(0.2, 0.6))
        return [
            _Lesion(
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
            # sizes skew small like real stones; 1-20 mm diameter
            diameter = float(np.clip(np.exp(rng.normal(np.log(5.0), 0.6)), 1.0, 20.0))
            composition = rng.random()
            hu = rng.uniform(200, 500) if composition < 0.25 else rng.uniform(600, 1500)
            out.append(
                _Lesion(
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
        radius = float(np.exp(rng.uniform(np.log(8.0), np.log(40.0))))
        ang = float(rng.uniform(0, 2 * math.pi))
        dist = float(rng.uniform(0.45, 0.95))
        return [
            _Lesion(
                "tumor",
                side,
                dist * math.cos(ang),
                dist * math.sin(ang),
                radius,
                float(rng.uniform(30, 60)),
                level,
                max(radius / 110.0, 0.08),
                necrotic=bool(rng.random() < 0.4 and radius > 12),
                shape=_harmonics(rng, 7, 0.35),
            )
        ]
    raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(CLASSES)}")


# --------------------------------------------------------------------------------------------
# Drawing helpers (OpenCV fills on float32 canvases, coordinates in mm)
# --------------------------------------------------------------------------------------------


class _Canvas:
    """HU canvas plus the mm -> pixel mapping."""

    def __init__(self, size: int, fov_mm: float) -> None:
        self.size = size
        self.fov = fov_mm
        self.px_mm = fov_mm / size
        self.hu = np.full((size, size), -1000.0, dtype=np.float32)

    def pts(self, xy: np.ndarray) -> np.ndarray:
        """mm (N, 2) -> fixed-point pixel coordinates for OpenCV."""
        p = (xy / self.px_mm + self.size / 2.0 - 0.5) * _SCALE
        return np.round(p).astype(np.int32).reshape(-1, 1, 2)

    def fill(self, xy: np.ndarray, value: float, target: np.ndarray | None = None) -> None:
        cv2.fillPoly(
            self.hu if target is None else target, [self.pts(xy)], float(value), cv2.LINE_8, _SHIFT
        )

    def line(self, xy: np.ndarray, value: float, thick_mm: float, closed: bool = False) -> None:
        t = max(1, int(round(thick_mm / self.px_mm)))
        cv2.polylines(self.hu, [self.pts(xy)], closed, float(value), t, cv2.LINE_8, _SHIFT)

    def disc(self, x: float, y: float, r_mm: float, value: float, target: np.ndarray) -> None:
        c = self.pts(np.array([[x, y]], dtype=np.float64))[0, 0]
        r = int(round(r_mm / self.px_mm * _SCALE))
        cv2.circle(target, (int(c[0]), int(c[1])), r, float(value), -1, cv2.LINE_8, _SHIFT)


_THETA = np.linspace(0.0, 2 * math.pi, 72, endpoint=False)


def _shape(
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


def _kidney_point(
    frame: tuple[float, float, float, float, float], u: float, v: float
) -> tuple[float, float]:
    """mm position of kidney-frame coordinates (fractions of the semi-axes a, b)."""
    kx, ky, a, b, ang = frame
    ca, sa = math.cos(math.radians(ang)), math.sin(math.radians(ang))
    return kx + ca * u * a - sa * v * b, ky + sa * u * a + ca * v * b


def _level_factor(level: float) -> float:
    """Axial kidney cross-section scale at a slice level (0 upper pole, 1 lower pole)."""
    d = (level - 0.5) / 0.62
    return math.sqrt(max(0.0, 1.0 - d * d))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _tissue(p: _Patient) -> dict[str, float]:
    """HU of each tissue for the patient's contrast phase (DESIGN.md facts)."""
    e = p.enh
    t = {
        "fat": p.fat_hu,
        "vfat": p.fat_hu + 8.0,
        "muscle": 48.0,
        "skin": 60.0,
        "liver": 58.0,
        "spleen": 46.0,
        "aorta": 42.0,
        "ivc": 40.0,
        "cortex": 36.0,
        "medulla": 31.0,
        "bowel_wall": 40.0,
        "pancreas": 42.0,
    }
    if p.phase == "arterial":
        t.update(
            aorta=42 + 260 * e,
            ivc=45 + 30 * e,
            cortex=36 + 140 * e,
            medulla=31 + 45 * e,
            liver=58 + 15 * e,
            spleen=46 + 70 * e,
            bowel_wall=40 + 40 * e,
            pancreas=42 + 70 * e,
        )
    elif p.phase == "portal":
        t.update(
            aorta=42 + 120 * e,
            ivc=40 + 100 * e,
            cortex=36 + 130 * e,
            medulla=31 + 120 * e,
            liver=58 + 50 * e,
            spleen=46 + 70 * e,
            bowel_wall=40 + 30 * e,
            pancreas=42 + 50 * e,
        )
    return t


def _render(p: _Patient, level: float, rng: np.random.Generator, image_size: int) -> PhantomSlice:
    site = p.site
    # small outputs are painted at >= 256 px and area-averaged: thin skin, table and vessel
    # walls then get partial volume instead of full-HU single-pixel lines
    ss = max(1, min(4, 256 // image_size))
    cv = _Canvas(image_size * ss, site.fov_mm)
    size = cv.size
    t = _tissue(p)
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
    body = _shape(0.0, cy, W, H, 0.0, p.body_shape)
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
    liver = _shape(
        -0.55 * W, cy + 0.05 * H, 0.62 * W * liver_s, 0.8 * H * liver_s, -25, p.body_shape[:4]
    )
    cv.fill(liver, t["liver"], inner)
    lx, ly = -0.55 * W, cy + 0.05 * H
    lrx, lry = 0.62 * W * liver_s, 0.8 * H * liver_s
    if p.phase != "none":  # enhancing portal / hepatic veins inside the liver
        for _ in range(int(tex.integers(3, 9))):
            rr, th = 0.7 * math.sqrt(tex.random()), tex.uniform(0, 2 * math.pi)
            vx, vy = lx + rr * lrx * math.cos(th), ly + rr * lry * math.sin(th)
            cv.fill(_shape(vx, vy, 3.5, 2.2, tex.uniform(0, 180)), t["ivc"] + 20, inner)
    if p.gallbladder and 0.15 < lv < 0.6:
        # fluid-filled gallbladder at the liver's medial edge: a cyst mimic in every class
        gx, gy = lx + 0.75 * lrx, ly - 0.3 * lry
        cv.fill(_shape(gx, gy, 16, 12, 30), float(tex.uniform(0, 20)), inner)
    if lv < 0.55:
        spleen_s = (0.55 - lv) / 0.55
        sp = _shape(0.62 * W, cy + 0.3 * H, 0.28 * W * spleen_s + 4, 0.4 * H * spleen_s + 4, 50)
        cv.fill(sp, t["spleen"], inner)
    if lv < 0.45:  # stomach with an air-fluid level at upper slices
        st = _shape(0.3 * W, cy - 0.45 * H, 0.28 * W, 0.22 * H, 10, p.body_shape[2:6])
        cv.fill(st, t["bowel_wall"], inner)
        st_in = _shape(0.3 * W, cy - 0.45 * H, 0.28 * W - 4, 0.22 * H - 4, 10, p.body_shape[2:6])
        stomach = np.zeros((size, size), np.uint8)
        cv.fill(st_in, 1, stomach)
        gas_row = int((cy - 0.5 * H) / cv.px_mm + size / 2)
        fill_hu = 250.0 if p.bowel_contrast else 12.0
        inner[stomach > 0] = fill_hu
        rows = slice(0, max(0, gas_row))
        inner[rows][stomach[rows] > 0] = -950.0
    # pancreas: lobulated band in front of the vessels
    if 0.2 < lv < 0.65:
        pan = _shape(
            0.1 * W, p.spine_y - 0.5 * H, 0.35 * W, 0.07 * H, -12, (0.0, 0.0, 0.1, 1.0, 0.12, 2.0)
        )
        cv.fill(pan, t["pancreas"], inner)
    # bowel loops: wall then content (gas, fluid, feces, oral contrast)
    for x, y, r, aspect, angle, content in p.bowel:
        # loops drift between neighbouring slices
        x_, y_ = x + 30 * math.sin(7 * lv + x), y + 30 * math.cos(5 * lv + y)
        cv.fill(_shape(x_, y_, r, r * aspect, angle), t["bowel_wall"], inner)
        rr = r - 2.0
        lumen = _shape(x_, y_, rr, rr * aspect, angle)
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
        cv.fill(_shape(s * (vr + 3 + 6 * ps), sy - 3, 7 * ps + 4, 9 * ps + 5, s * 30), t["muscle"])
        # paraspinal muscles behind the transverse processes
        cv.fill(_shape(s * 27, sy + 33, 22, 17, s * 10), t["muscle"])
        cv.fill(_shape(s * 52, sy + 14, 10, 17, s * 40), t["muscle"])  # quadratus lumborum
    # vertebra: cortical shell, cancellous core, canal, pedicles, transverse and spinous process
    cv.fill(_shape(0, sy, vr, vr * 0.85), 900.0 * bone_scale)
    cv.fill(_shape(0, sy, vr - 2.2, vr * 0.85 - 2.2), p.cancellous_hu * bone_scale)
    post = 900.0 * bone_scale
    for s in (-1.0, 1.0):  # pedicles and laminae ring the canal; transverse processes
        cv.line(np.array([[s * 8, sy + 12], [s * 11, sy + 22], [s * 3, sy + 32]]), post, 3)
        cv.line(np.array([[s * 10, sy + 18], [s * 26, sy + 19]]), post, 3)
    cv.fill(_shape(0, sy + 40, 3, 9), post)  # spinous process
    cv.fill(_shape(0, sy + 22, 8, 7), 10.0)  # spinal canal (CSF)
    # aorta (patient left = image right, anterior to spine) and IVC (patient right)
    # anterior and to the left of the vertebral body, touching it, as at the renal hilum
    ar = 11.0 * float(0.9 + 0.2 * (p.width > 300))
    ax, ay = 0.8 * vr + 2, sy - 0.85 * vr - 0.6 * ar
    cv.fill(_shape(ax, ay, ar, ar), t["aorta"])
    calcified = bool(p.aortic_calc)
    for start, extent in p.aortic_calc:
        rad = np.radians(np.linspace(start, start + extent, 12))
        cv.line(np.stack([ax + ar * np.cos(rad), ay + ar * np.sin(rad)], 1), 700 * bone_scale, 1.5)
    cv.fill(_shape(-ax - 14, ay + 2, 14, 9, 0), t["ivc"])

    # kidneys: cortex, medulla (pyramids), sinus fat, pelvis, renal vein
    kidney_mask = np.zeros((size, size), np.uint8)
    lesion_mask = np.zeros((size, size), np.uint8)
    frames = {}
    for s in (-1, 1):
        # the left kidney (image right) sits higher, so a slice cuts it nearer its lower pole
        klev = lv + (p.left_offset if s == 1 else 0.0)
        f = _level_factor(klev)
        if f < 0.15:
            continue
        a = 30.0 * p.kidney_size * (0.45 + 0.55 * f)
        b = 21.0 * p.kidney_size * (0.5 + 0.5 * f)
        # kidney centres a little anterior to the vertebral body's centre, as on real slices
        kx, ky = s * p.kidney_dx, sy + KIDNEY_DY
        # long axis from anterolateral to posteromedial; in the kidney frame (u along the long
        # axis, v along the short one) the hilum lies at v = +s (anteromedial)
        ang = 90.0 + s * p.kidney_angle
        frames[s] = (kx, ky, a, b, ang)
        outline = _shape(kx, ky, a, b, ang, (0.02, 0.3, 0.03, 1.0))
        cv.fill(outline, 1, kidney_mask)
        cv.fill(outline, t["cortex"])
        for j in range(5):  # medullary pyramids on the lateral side, pointing to the sinus
            phi = math.radians(s * 90 + 180 + (j - 2) * 38)
            mx, my = _kidney_point(frames[s], 0.55 * math.cos(phi), 0.55 * math.sin(phi))
            cv.fill(_shape(mx, my, 0.2 * a, 0.13 * a, ang + math.degrees(phi)), t["medulla"])
        if abs(klev - 0.5) < 0.22:  # hilar slices: sinus fat, pelvis and renal vein
            hx, hy = _kidney_point(frames[s], 0.0, 0.6 * s)
            cv.fill(_shape(hx, hy, 0.42 * a, 0.5 * b, ang), t["vfat"])
            px_, py_ = _kidney_point(frames[s], 0.0, 0.55 * s)
            cv.fill(_shape(px_, py_, 0.24 * a, 0.28 * b, ang), 8.0)
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
                cv.fill(_shape(rx_, ry_, 5, 3, math.degrees(th) + 90), 700 * bone_scale)

    # ---- lesions (painted last so they replace parenchyma) ---------------------------------
    les_meta = _draw_lesions(p, cv, frames, lv, tex, t, lesion_mask)

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


def _draw_lesions(
    p: _Patient,
    cv: _Canvas,
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
        x, y = _kidney_point(frames[side], les.u, les.v * side)
        # cross-section of a 3-D lesion; every slice of a lesion patient still shows it
        d = (level - les.level) / max(les.extent, 1e-3)
        r = les.radius_mm * max(math.sqrt(max(0.0, 1.0 - d * d)), 0.6)
        if les.kind != "stone":  # stones get exact partial volume instead (_draw_stone)
            r = max(r, 0.5 * cv.px_mm)
        if les.kind == "stone":
            _draw_stone(cv, x, y, r, les.hu, lesion_mask)
            value = les.hu  # the stone's material HU; small stones are diluted in their pixels
        elif les.kind == "cyst":  # homogeneous fluid, sharp wall
            outline = _shape(x, y, r, r * 0.95, ang)
            cv.fill(outline, 1, lesion_mask)
            cv.fill(outline, les.hu)
            value = les.hu
        else:  # tumor: heterogeneous solid mass, irregular margin, optional necrotic centre
            local = np.zeros_like(lesion_mask)
            cv.fill(_shape(x, y, r, r * 0.9, ang, les.shape), 1, local)
            enh = {"none": 0.0, "arterial": 70.0, "portal": 50.0}[p.phase] * p.enh
            ys, xs = np.nonzero(local)
            # heterogeneity on two scales: patchy enhancement and fine grain
            y0, x0 = int(ys.min()), int(xs.min())
            h, w = int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1
            cells = tex.standard_normal((5, 5), dtype=np.float32)
            patch = cv2.resize(cells, (w, h), interpolation=cv2.INTER_CUBIC)[ys - y0, xs - x0]
            grain = tex.normal(0, 4, ys.size).astype(np.float32)
            vals = les.hu + enh * (0.7 + 0.5 * patch) + 10.0 * patch + grain
            if les.necrotic:
                nec = np.zeros_like(local)
                cv.fill(_shape(x, y, 0.45 * r, 0.4 * r, ang, les.shape[4:]), 1, nec)
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


def _draw_stone(cv: _Canvas, x: float, y: float, r_mm: float, hu: float, mask: np.ndarray) -> None:
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
        int(round(((cx - x0 + 0.5) * ss - 0.5) * _SCALE)),
        int(round(((cy - y0 + 0.5) * ss - 0.5) * _SCALE)),
    )
    cv2.circle(fine, centre, int(round(rp * ss * _SCALE)), 1.0, -1, cv2.LINE_8, _SHIFT)
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
    patient = _sample_patient(rng, name, site, slice_level)
    return _render(patient, slice_level, rng, image_size)


# --------------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------------


def _balanced_counts(n: int, sites: list[SiteProfile]) -> np.ndarray:
    """Site x class image counts: equal class totals overall, each site's own mix and size.

    Iterative proportional fitting of the sites' class weights to row sums (site shares) and
    column sums (n / 4 per class), then largest-remainder rounding so totals are exact.
    """
    k = len(CLASSES)
    w = np.array([s.class_weights for s in sites], dtype=np.float64)
    w = w / w.sum(axis=1, keepdims=True)
    share = np.array([s.share for s in sites], dtype=np.float64)
    rows = n * share / share.sum()
    cols = np.full(k, n / k)
    m = w * rows[:, None]
    for _ in range(200):
        m *= (cols / np.maximum(m.sum(axis=0), 1e-12))[None, :]
        m *= (rows / np.maximum(m.sum(axis=1), 1e-12))[:, None]
    # exact integer column totals (n split as evenly as possible), rows follow
    col_int = np.full(k, n // k)
    col_int[: n % k] += 1
    out = np.floor(m).astype(int)
    for c in range(k):
        missing = col_int[c] - out[:, c].sum()
        order = np.argsort(-(m[:, c] - out[:, c]), kind="stable")
        for i in range(missing):
            out[order[i % len(sites)], c] += 1
    return out


@dataclass
class _Job:
    class_name: str
    site: int
    patient_id: str
    slices: int
    seed: tuple[int, ...]
    phase: str = "none"
    level_u: float | None = None  # stratified position of the slice block (0-1)
    width_u: float | None = None  # stratified patient width within the site's range (0-1)


def _plan(n: int, seed: int, sites: list[SiteProfile]) -> dict[str, list[_Job]]:
    """Patients per class in file order; each gives 1-4 slices with consecutive indices."""
    counts = _balanced_counts(n, sites)
    rng = np.random.default_rng([seed, 1])
    plan: dict[str, list[_Job]] = {}
    pid = 0
    for c, name in enumerate(CLASSES):
        jobs: list[_Job] = []
        for s in range(len(sites)):
            left = int(counts[s, c])
            while left > 0:
                k = min(left, int(rng.integers(1, 5)))
                jobs.append(_Job(name, s, f"P{pid:05d}", k, (seed, 2, pid)))
                pid += 1
                left -= k
            cell = [j for j in jobs if j.site == s]
            _assign_phases(cell, sites[s], rng)
            _stratify(cell, rng)
        order = rng.permutation(len(jobs))  # interleave the sites' patients within a class
        plan[name] = [jobs[i] for i in order]
    return plan


def _assign_phases(jobs: list[_Job], site: SiteProfile, rng: np.random.Generator) -> None:
    """Give each patient of one (site, class) cell a contrast phase, stratified by images.

    Drawing the phase independently per patient leaves, in small sets, chance differences of
    20-30 points in the enhanced share between classes: a contrast shortcut. Assigning phases
    greedily to the phase furthest below its target image count keeps every class at the
    site's own rates.
    """
    p_art = site.contrast_prob * site.arterial_fraction
    target = np.array([1.0 - site.contrast_prob, p_art, site.contrast_prob - p_art])
    done = np.zeros(3)
    for i in rng.permutation(len(jobs)):
        total = done.sum() + jobs[i].slices
        deficit = target * total - done + rng.uniform(0, 1e-6, 3)  # random tie-break
        k = int(np.argmax(deficit))
        jobs[i].phase = _PHASES[k]
        done[k] += jobs[i].slices


def _stratify(jobs: list[_Job], rng: np.random.Generator) -> None:
    """Latin-hypercube slice level and patient width for the patients of one (site, class) cell.

    Slice level moves the mean grey level a lot (liver and spleen shrink towards the lower
    pole). With ~100 patients per class, independent draws leave chance differences of 0.05
    in mean level between classes, enough for a grey-level classifier to beat chance; one
    draw per equal-probability stratum makes every class cover the range evenly.
    """
    m = len(jobs)
    if m == 0:
        return
    levels = (rng.permutation(m) + rng.random(m)) / m
    widths = (rng.permutation(m) + rng.random(m)) / m
    for job, lu, wu in zip(jobs, levels, widths, strict=True):
        job.level_u, job.width_u = float(lu), float(wu)


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
    if phase is not None and phase not in _PHASES:
        raise ValueError(f"phase must be one of {', '.join(_PHASES)}, got {phase!r}")
    for name, u in (("level_u", level_u), ("width_u", width_u)):
        if u is not None and not 0.0 <= u <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {u}")
    rng = np.random.default_rng(list(job_seed))
    step = float(rng.uniform(0.03, 0.045))  # 3-5 mm over a ~110 mm kidney
    lo, hi = 0.12, 0.88 - step * (n_slices - 1)
    start = lo + (hi - lo) * (float(rng.random()) if level_u is None else level_u)
    centre = start + step * (n_slices - 1) / 2
    patient = _sample_patient(rng, _check_class(class_name), site, centre, width_u)
    if phase is not None:
        patient.phase = phase
    for i in range(n_slices):
        yield _render(patient, start + i * step, rng, image_size)


def generate_dataset(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    sites: int | Sequence[SiteProfile] = 1,
    image_size: int = 512,
    progress: bool = False,
) -> Path:
    """Write a synthetic dataset in the public CT-KIDNEY layout.

    Layout: ``<out>/<Class>/<Class>- (<k>).jpg`` (8-bit grayscale JPEG, quality 95),
    ``kidneyData.csv`` (columns ``,image_id,path,diag,target,Class``),
    ``masks/<image_id>_{body,kidney,lesion}.png``, ``clean/<image_id>.png`` (noise-free,
    windowed, lossless) and ``phantom_metadata.csv`` (see :data:`METADATA_COLUMNS`).

    Parameters
    ----------
    out_dir : str or Path
        Output folder; created if needed. Existing phantom files of the same names are replaced.
    n : int
        Number of images (>= 1), split evenly over the four classes.
    seed : int
        Seed: the same seed writes the same bytes.
    sites : int or sequence of SiteProfile
        Number of hospitals (profiles from :func:`make_sites`) or explicit profiles.
    image_size : int
        Image side in pixels (>= 32).
    progress : bool
        Show a progress bar (rich) while writing.

    Returns
    -------
    Path
        ``out_dir``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    profiles = make_sites(sites, seed) if isinstance(sites, int) else list(sites)
    if not profiles:
        raise ValueError("sites must be >= 1 or a non-empty list of SiteProfile")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    _clear_previous(out)
    for sub in (*CLASSES, "masks", "clean"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    plan = _plan(n, seed, profiles)

    rows: list[dict[str, Any]] = []
    bar = _progress(progress, n)
    try:
        for c, name in enumerate(CLASSES):
            k = 0
            # like the real sample, file numbers run on across patients but jump now and then
            # (a new scan series): index blocks then hold several patients, never split one
            gaps = np.random.default_rng([seed, 3, c])
            for j, job in enumerate(plan[name]):
                if j and gaps.random() < SERIES_BREAK_PROB:
                    k += int(gaps.integers(20, 200))
                slices = iter_patient_slices(
                    job.seed,
                    name,
                    profiles[job.site],
                    job.slices,
                    image_size,
                    job.phase,
                    job.level_u,
                    job.width_u,
                )
                for i, sl in enumerate(slices):
                    k += 1
                    image_id = f"{name}- ({k})"
                    rel = f"{name}/{image_id}.jpg"
                    _write(out, rel, image_id, sl)
                    m = sl.meta
                    rows.append(
                        {
                            "image_id": image_id,
                            "path": rel,
                            "Class": name,
                            "target": c,
                            "site": m["site"],
                            "patient_id": job.patient_id,
                            "slice_index": i,
                            **{key: m[key] for key in METADATA_COLUMNS if key in m},
                        }
                    )
                    bar(1)
    finally:
        bar(0, close=True)

    with (out / "kidneyData.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "image_id", "path", "diag", "target", "Class"])
        for i, r in enumerate(rows):
            w.writerow([i, r["image_id"], r["path"], r["Class"], r["target"], r["Class"]])
    with (out / "phantom_metadata.csv").open("w", newline="") as fh:
        dw = csv.DictWriter(fh, fieldnames=list(METADATA_COLUMNS))
        dw.writeheader()
        for r in rows:
            dw.writerow({k: r.get(k, "") for k in METADATA_COLUMNS})
    with (out / "phantom_sites.csv").open("w", newline="") as fh:
        dw = csv.DictWriter(fh, fieldnames=list(asdict(profiles[0])))
        dw.writeheader()
        for s in profiles:
            dw.writerow(asdict(s))
    return out


def _clear_previous(out: Path) -> None:
    """Remove the files of an earlier phantom in ``out`` so no stale image survives.

    Only files listed in an earlier ``phantom_metadata.csv`` are removed; a folder holding
    other images (real data, say) is refused rather than mixed with synthetic ones.
    """
    meta = out / "phantom_metadata.csv"
    root = out.resolve()
    if meta.is_file():
        with meta.open(newline="") as fh:
            ids = [(r["image_id"], r["path"]) for r in csv.DictReader(fh) if r.get("path")]
        for image_id, rel in ids:
            for f in (
                out / rel,
                out / "clean" / f"{image_id}.png",
                *(out / "masks" / f"{image_id}_{k}.png" for k in ("body", "kidney", "lesion")),
            ):
                # a hand-edited csv must not delete anything outside the dataset folder
                if f.resolve().is_relative_to(root) and f.parent.resolve() != root:
                    f.unlink(missing_ok=True)
    for c in CLASSES:
        folder = out / c
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(
                f"{out}: {c}/ already holds files that are not from a phantom run; "
                "choose an empty output folder"
            )


def _to_u8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _write(out: Path, rel: str, image_id: str, sl: PhantomSlice) -> None:
    # cv2.imencode + write_bytes: OpenCV's imwrite mishandles some non-ASCII paths
    ok, buf = cv2.imencode(".jpg", _to_u8(sl.image), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise OSError(f"{out / rel}: JPEG encoding failed")
    (out / rel).write_bytes(buf.tobytes())
    for key, mask in sl.masks.items():
        # 1-bit PNG: encodes twice as fast as 8-bit; loads as bool (PIL) or 0/255 (OpenCV)
        Image.fromarray(mask).save(out / "masks" / f"{image_id}_{key}.png", compress_level=1)
    _, b = cv2.imencode(".png", _to_u8(sl.clean), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    (out / "clean" / f"{image_id}.png").write_bytes(b.tobytes())


class _NoBar:
    def __call__(self, step: int, close: bool = False) -> None:
        return None


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return _NoBar()
    from rich.progress import Progress

    prog = Progress()
    prog.start()
    task = prog.add_task("phantom", total=total)

    def advance(step: int, close: bool = False) -> None:
        if step:
            prog.advance(task, step)
        if close:
            prog.stop()

    return advance
