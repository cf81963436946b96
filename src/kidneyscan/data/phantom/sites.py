"""Hospitals of the phantom: scanner, population and class mix of each site (``SiteProfile``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Class names in the order of the CT-KIDNEY ``target`` codes; equal to
#: ``kidneyscan.data.datasets.CLASSES`` (checked by the tests).
CLASSES: tuple[str, ...] = ("Cyst", "Normal", "Stone", "Tumor")


PHASES = ("none", "arterial", "portal")


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
