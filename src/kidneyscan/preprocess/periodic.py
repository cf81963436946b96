"""Periodic (interference) noise in the frequency domain: find spectral spikes, notch, subtract.

Functions take a float32 (H, W) image in [0, 1] and return float32 (H, W) in [0, 1] (except
:func:`fit_periodic`, which returns the fitted wave). :func:`kidneyscan.preprocess.restore.
estimate_noise` calls :func:`find_periodic_peaks` to tell periodic noise from random noise;
``restore`` re-exports every name here.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy import optimize

from kidneyscan.preprocess._checks import as_image, clip_unit, positive
from kidneyscan.preprocess.pipeline import register_step

__all__ = ["find_periodic_peaks", "fit_periodic", "notch_filter", "subtract_periodic"]


def find_periodic_peaks(
    image: np.ndarray, *, ratio: float = 8.0, min_radius: int = 6, max_peaks: int = 8
) -> list[tuple[int, int]]:
    """Locate isolated spectral spikes (periodic interference) in the centred FFT magnitude.

    A Hann window suppresses the border cross; a pixel counts as a spike when it is a local
    maximum, at least ``min_radius`` frequency bins from DC and ``ratio`` times above the
    median magnitude of its 15 x 15 neighbourhood. The default 8 is about twice the largest
    ratio measured on noise-free phantom-like slices and on real CT-KIDNEY slices (<= 4.5).

    Returns
    -------
    list of (row, col)
        Offsets from the spectrum centre, one per conjugate pair (``row >= 0`` half-plane).
    """
    img = as_image(image).astype(np.float64)
    win = np.outer(np.hanning(img.shape[0]), np.hanning(img.shape[1]))
    mag = np.abs(np.fft.fftshift(np.fft.fft2((img - img.mean()) * win)))
    background = ndi.median_filter(mag, size=15, mode="wrap") + 1e-12
    local_max = mag == ndi.maximum_filter(mag, size=5, mode="wrap")
    cy, cx = img.shape[0] // 2, img.shape[1] // 2
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    far = (yy - cy) ** 2 + (xx - cx) ** 2 >= min_radius**2
    cand = np.argwhere(local_max & far & (mag / background > ratio))
    order = np.argsort(-mag[cand[:, 0], cand[:, 1]])
    peaks: list[tuple[int, int]] = []
    for r, c in cand[order]:
        dy, dx = int(r - cy), int(c - cx)
        if dy < 0 or (dy == 0 and dx < 0):
            dy, dx = -dy, -dx  # keep one representative of each conjugate pair
        if (dy, dx) not in peaks:
            peaks.append((dy, dx))
        if len(peaks) >= max_peaks:
            break
    return peaks


@register_step("notch")
def notch_filter(
    image: np.ndarray,
    *,
    peaks: list[tuple[int, int]] | list[list[int]] | None = None,
    radius: float = 3.0,
) -> np.ndarray:
    """Gaussian notch-reject filter for periodic noise.

    Parameters
    ----------
    peaks
        Spike offsets ``(row, col)`` from the spectrum centre (their conjugates are notched
        too); ``None`` detects them with :func:`find_periodic_peaks`. No spike -> the image
        is returned unchanged.
    radius
        Gaussian notch standard deviation in frequency bins.
    """
    img = as_image(image)
    positive(radius, name="radius")
    found = find_periodic_peaks(img) if peaks is None else [tuple(p) for p in peaks]
    if not found:
        return img.copy()
    h, w = img.shape
    cy, cx = h // 2, w // 2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    transfer = np.ones((h, w))
    for dy, dx in found:
        for sy, sx in ((dy, dx), (-dy, -dx)):
            d2 = (yy - cy - sy) ** 2 + (xx - cx - sx) ** 2
            transfer *= 1.0 - np.exp(-d2 / (2.0 * radius**2))
    spec = np.fft.fftshift(np.fft.fft2(img.astype(np.float64)))
    return clip_unit(np.real(np.fft.ifft2(np.fft.ifftshift(spec * transfer))))


def fit_periodic(image: np.ndarray, peaks: list[tuple[int, int]] | list[list[int]]) -> np.ndarray:
    """Least-squares model of the sinusoids behind spectral ``peaks``, away from clipping.

    Each spike's frequency is refined off the FFT grid (periodogram maximum, Nelder-Mead
    from the bin), then amplitudes and phases of all sinusoids (and a constant) are fitted
    jointly to the pixels far from any clipped one, where ``y = x + wave`` holds exactly.
    Returns the fitted wave (float64, zero mean, same shape).
    """
    img = as_image(image).astype(np.float64)
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    clipped = (img <= 1e-6) | (img >= 1 - 1e-6)
    # Only pixels with no clipped pixel within 4 px: where the wave was cut off (air), the
    # pixels that survive are those where it was positive, which would bias the fit.
    ok = ~ndi.maximum_filter(clipped, size=9, mode="reflect")
    if ok.sum() < 16 or not peaks:
        return np.zeros(img.shape)
    ys, xs, vals = yy[ok].astype(np.float64), xx[ok].astype(np.float64), img[ok]
    vals = vals - vals.mean()

    def power(f: np.ndarray) -> float:
        ph = 2 * np.pi * (f[0] * ys + f[1] * xs)
        return -float(np.abs(np.sum(vals * np.exp(-1j * ph))) ** 2)

    freqs = []
    for dy, dx in peaks:
        f0 = np.array([dy / h, dx / w], dtype=np.float64)
        res = optimize.minimize(
            power,
            f0,
            method="Nelder-Mead",
            options={
                "xatol": 1e-6,
                "fatol": 1e-9,
                "initial_simplex": [f0, f0 + [0.5 / h, 0], f0 + [0, 0.5 / w]],
            },
        )
        freqs.append(res.x)
    cols = [np.ones_like(ys)]
    for fy, fx in freqs:
        ph = 2 * np.pi * (fy * ys + fx * xs)
        cols += [np.cos(ph), np.sin(ph)]
    coef, *_ = np.linalg.lstsq(np.stack(cols, 1), img[ok], rcond=None)
    wave = np.zeros(img.shape)
    for k, (fy, fx) in enumerate(freqs):
        ph = 2 * np.pi * (fy * yy + fx * xx)
        wave += coef[1 + 2 * k] * np.cos(ph) + coef[2 + 2 * k] * np.sin(ph)
    return wave


@register_step("periodic_subtract")
def subtract_periodic(
    image: np.ndarray, *, peaks: list[tuple[int, int]] | list[list[int]] | None = None
) -> np.ndarray:
    """Remove periodic interference by fitting and subtracting it (:func:`fit_periodic`).

    Unlike the notch filter this removes the whole sinusoid, not a band of the spectrum, so
    image detail at those frequencies survives; pixels clipped at 0 or 1 (black air, where
    the interference was cut off) are left at 0 / 1, their most likely true value.
    No spike (``peaks=None`` detects them with :func:`find_periodic_peaks`) -> unchanged.
    """
    img = as_image(image)
    found = find_periodic_peaks(img) if peaks is None else [tuple(p) for p in peaks]
    if not found:
        return img.copy()
    wave = fit_periodic(img, found)  # type: ignore[arg-type]
    out = img.astype(np.float64) - wave
    clipped = (img <= 1e-6) | (img >= 1 - 1e-6)
    out[clipped] = img[clipped]
    return clip_unit(out)
