"""Seeded noise models for degrading clean phantom images reproducibly.

Each ``add_*`` function takes a float32 (H, W) image in [0, 1] and a ``rng``
(:class:`numpy.random.Generator` or an int seed) and returns a float32 image clipped to
[0, 1]. The additive models with a skewed distribution (exponential, Erlang, Rayleigh,
uniform) are centred to zero mean so that brightness is unchanged and only the noise
*shape* differs; their ``sigma`` is the standard deviation in intensity units, which makes
the noise types comparable at one level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from skimage.util import random_noise

from kidneyscan.preprocess._checks import as_image, positive

RngLike = np.random.Generator | int | None


def _rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise ValueError("pass rng (a numpy Generator or an int seed) so the noise is reproducible")
    return np.random.default_rng(int(rng))


def _finish(image: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return np.clip(image + noise, 0.0, 1.0).astype(np.float32)


def add_gaussian(image: np.ndarray, *, sigma: float = 0.05, rng: RngLike = None) -> np.ndarray:
    """Additive zero-mean Gaussian noise with standard deviation ``sigma``."""
    img = as_image(image)
    positive(sigma, name="sigma")
    return _finish(img, _rng(rng).normal(0.0, sigma, img.shape))


def add_salt_pepper(
    image: np.ndarray, *, amount: float = 0.05, salt_vs_pepper: float = 0.5, rng: RngLike = None
) -> np.ndarray:
    """Impulse noise: a fraction ``amount`` of pixels set to 1 (salt) or 0 (pepper).

    Wraps :func:`skimage.util.random_noise` with ``mode="s&p"``.
    """
    img = as_image(image)
    if not 0 < amount <= 1 or not 0 <= salt_vs_pepper <= 1:
        raise ValueError(f"need 0 < amount <= 1 and 0 <= salt_vs_pepper <= 1, got {amount}")
    out = random_noise(img, mode="s&p", amount=amount, salt_vs_pepper=salt_vs_pepper, rng=_rng(rng))
    return out.astype(np.float32)


def add_poisson(image: np.ndarray, *, peak: float = 200.0, rng: RngLike = None) -> np.ndarray:
    """Photon-counting (Poisson) noise: ``Poisson(image * peak) / peak``.

    Lower ``peak`` (expected counts at intensity 1) means stronger, signal-dependent noise;
    the standard deviation at intensity ``x`` is ``sqrt(x / peak)``.
    """
    img = as_image(image)
    positive(peak, name="peak")
    return np.clip(_rng(rng).poisson(img * peak) / peak, 0.0, 1.0).astype(np.float32)


def add_exponential(image: np.ndarray, *, sigma: float = 0.05, rng: RngLike = None) -> np.ndarray:
    """Additive exponential noise (scale ``sigma``), centred to zero mean."""
    img = as_image(image)
    positive(sigma, name="sigma")
    return _finish(img, _rng(rng).exponential(sigma, img.shape) - sigma)


def add_erlang(
    image: np.ndarray, *, sigma: float = 0.05, shape: int = 2, rng: RngLike = None
) -> np.ndarray:
    """Additive gamma (Erlang) noise with integer ``shape`` and std ``sigma``, zero mean."""
    img = as_image(image)
    positive(sigma, name="sigma")
    if int(shape) != shape or shape < 1:
        raise ValueError(f"Erlang shape must be an integer >= 1, got {shape}")
    scale = sigma / np.sqrt(shape)
    return _finish(img, _rng(rng).gamma(shape, scale, img.shape) - shape * scale)


def add_rayleigh(image: np.ndarray, *, sigma: float = 0.05, rng: RngLike = None) -> np.ndarray:
    """Additive Rayleigh noise with standard deviation ``sigma``, centred to zero mean."""
    img = as_image(image)
    positive(sigma, name="sigma")
    scale = sigma / np.sqrt((4.0 - np.pi) / 2.0)
    return _finish(img, _rng(rng).rayleigh(scale, img.shape) - scale * np.sqrt(np.pi / 2.0))


def add_uniform(image: np.ndarray, *, sigma: float = 0.05, rng: RngLike = None) -> np.ndarray:
    """Additive zero-mean uniform noise with standard deviation ``sigma``."""
    img = as_image(image)
    positive(sigma, name="sigma")
    half = sigma * np.sqrt(3.0)
    return _finish(img, _rng(rng).uniform(-half, half, img.shape))


def add_periodic(
    image: np.ndarray,
    *,
    amplitude: float = 0.1,
    frequency: float = 0.125,
    angle: float | None = None,
    rng: RngLike = None,
) -> np.ndarray:
    """Additive sinusoidal interference ``amplitude * sin(2 pi f (x cos a + y sin a) + phase)``.

    Parameters
    ----------
    amplitude
        Peak amplitude in intensity units.
    frequency
        Cycles per pixel (0 < f < 0.5).
    angle
        Direction in degrees; ``None`` draws it (and the phase) from ``rng``.
    """
    img = as_image(image)
    positive(amplitude, name="amplitude")
    if not 0 < frequency < 0.5:
        raise ValueError(f"frequency must be in (0, 0.5) cycles/pixel, got {frequency}")
    gen = _rng(rng)
    a = np.deg2rad(gen.uniform(0, 180) if angle is None else float(angle))
    phase = gen.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]].astype(np.float64)
    wave = amplitude * np.sin(2 * np.pi * frequency * (xx * np.cos(a) + yy * np.sin(a)) + phase)
    return _finish(img, wave)


#: Noise models by name, with the default parameters used by the benchmark.
NOISE_MODELS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian": add_gaussian,
    "salt_pepper": add_salt_pepper,
    "poisson": add_poisson,
    "exponential": add_exponential,
    "erlang": add_erlang,
    "rayleigh": add_rayleigh,
    "uniform": add_uniform,
    "periodic": add_periodic,
}


def add_noise(image: np.ndarray, kind: str, *, rng: RngLike = None, **params: Any) -> np.ndarray:
    """Degrade ``image`` with the noise model ``kind`` (a key of :data:`NOISE_MODELS`)."""
    if kind not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {kind!r}; known: {', '.join(NOISE_MODELS)}")
    return NOISE_MODELS[kind](image, rng=rng, **params)
