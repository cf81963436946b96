"""The synthetic patient: body, organs and kidneys, shared by the neighbouring slices.

HU values follow ``DESIGN.md`` ("Facts for the synthetic kidney-CT phantom").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kidneyscan.data.phantom.sites import SiteProfile

#: Kidney centre relative to the vertebral body's centre (mm, + is posterior).
KIDNEY_DY = -6.0
#: Radial harmonics of the kidney outline (a slightly lobulated bean), see ``deformed_ellipse``.
KIDNEY_SHAPE = (0.02, 0.3, 0.03, 1.0)

#: A kidney's axial cross-section: centre x, y (mm), semi-axes a, b (mm), long-axis angle (deg).
Frame = tuple[float, float, float, float, float]


@dataclass
class Lesion:
    """One cyst, stone or tumour of a patient, in kidney coordinates."""

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
class Patient:
    """What stays the same between the neighbouring slices of one synthetic patient."""

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
    lesions: list[Lesion]
    body_shape: tuple[float, ...]
    texture_seed: int


def random_harmonics(rng: np.random.Generator, k_max: int, amp: float) -> tuple[float, ...]:
    """Random radial harmonics (amplitude, phase per order 2..k_max) for smooth deformations."""
    out: list[float] = []
    for k in range(2, k_max + 1):
        out += [float(rng.normal(0, amp / k)), float(rng.uniform(0, 2 * math.pi))]
    return tuple(out)


def _sample_phase(rng: np.random.Generator, site: SiteProfile) -> str:
    if rng.random() >= site.contrast_prob:
        return "none"
    return "arterial" if rng.random() < site.arterial_fraction else "portal"


def sample_patient(
    rng: np.random.Generator,
    class_name: str,
    site: SiteProfile,
    level: float,
    width_u: float | None = None,
) -> Patient:
    """Draw the anatomy of one patient of ``site`` (its ``lesions`` are still empty).

    ``width_u`` in [0, 1) places the patient width within the site's range (random when None).
    :func:`kidneyscan.data.phantom.lesions.sample_lesions` then draws the lesions from the same
    ``rng``, right after this, which keeps every phantom byte-identical to the one-module version.
    """
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
    patient = Patient(
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
        body_shape=random_harmonics(rng, 5, 0.06),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )
    return patient


def kidney_point(
    frame: tuple[float, float, float, float, float], u: float, v: float
) -> tuple[float, float]:
    """mm position of kidney-frame coordinates (fractions of the semi-axes a, b)."""
    kx, ky, a, b, ang = frame
    ca, sa = math.cos(math.radians(ang)), math.sin(math.radians(ang))
    return kx + ca * u * a - sa * v * b, ky + sa * u * a + ca * v * b


def level_factor(level: float) -> float:
    """Axial kidney cross-section scale at a slice level (0 upper pole, 1 lower pole)."""
    d = (level - 0.5) / 0.62
    return math.sqrt(max(0.0, 1.0 - d * d))


def kidney_geometry(p: Patient, level: float) -> list[tuple[int, float, Frame]]:
    """``(side, kidney level, frame)`` of each kidney a slice at ``level`` cuts.

    ``side`` is -1 for the image-left kidney (patient right), +1 for the other; a kidney whose
    cross-section would be under 15 % of its largest is past its pole and left out.
    """
    out: list[tuple[int, float, Frame]] = []
    for s in (-1, 1):
        # the left kidney (image right) sits higher, so a slice cuts it nearer its lower pole
        klev = level + (p.left_offset if s == 1 else 0.0)
        f = level_factor(klev)
        if f < 0.15:
            continue
        a = 30.0 * p.kidney_size * (0.45 + 0.55 * f)
        b = 21.0 * p.kidney_size * (0.5 + 0.5 * f)
        # long axis from anterolateral to posteromedial; in the kidney frame (u along the long
        # axis, v along the short one) the hilum lies at v = +s (anteromedial); centres a
        # little anterior to the vertebral body's centre, as on real slices
        centre = (s * p.kidney_dx, p.spine_y + KIDNEY_DY)
        out.append((s, klev, (*centre, a, b, 90.0 + s * p.kidney_angle)))
    return out


def perirenal_fat_mm(p: Patient) -> float:
    """Width of the perirenal fat rim (mm): 2-8 mm, wider in patients with more body fat."""
    return float(np.clip(1.5 + 0.2 * p.fat, 2.0, 8.0))


def tissue_hu(p: Patient) -> dict[str, float]:
    """HU of each tissue for this patient (fat, muscle, organs, enhanced kidney, ...)."""
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
