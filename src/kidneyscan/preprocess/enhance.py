"""Enhancement: CT windowing, histogram methods, point transforms, kernels, smoothing, FFT filters.

Every function takes a float32 (H, W) image in [0, 1] and returns a float32 image of the same
shape in [0, 1], except :func:`window_ct` which takes Hounsfield units. Functions usable in a
:class:`~kidneyscan.preprocess.pipeline.Preprocessor` are registered with ``register_step``;
their keyword arguments are the step's JSON parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import exposure, filters

from kidneyscan.data.windows import WINDOWS, Window
from kidneyscan.preprocess._checks import as_image, odd_size, positive
from kidneyscan.preprocess.pipeline import register_step


def _window(window: str | Sequence[float] | Window) -> Window:
    # Pairs stay ``(level, width)`` here: saved preprocessing steps (checkpoint metadata) and
    # callers pass them in that order; a Window object says which number is which.
    if isinstance(window, Window):
        positive(window.width, name="window width")
        return window
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; known: {', '.join(WINDOWS)}")
        return WINDOWS[window]
    vals = tuple(float(v) for v in window)
    if len(vals) != 2:
        raise ValueError(f"a CT window is (level, width), got {window!r}")
    positive(vals[1], name="window width")
    return Window(width=vals[1], level=vals[0])


def window_ct(hu: np.ndarray, *, window: str | Sequence[float] | Window = "abdomen") -> np.ndarray:
    """Map Hounsfield units to [0, 1] through a CT window.

    Parameters
    ----------
    hu
        (H, W) array of Hounsfield units (any real dtype, e.g. int16 from DICOM).
    window
        A name from :data:`WINDOWS`, a :class:`~kidneyscan.data.windows.Window`, or
        ``(level, width)`` in HU. Values below ``level - width/2`` map to 0, above
        ``level + width/2`` to 1.

    Returns
    -------
    numpy.ndarray
        float32 (H, W) in [0, 1].
    """
    arr = np.asarray(hu)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"hu must be a 2-D numeric array, got shape {arr.shape} {arr.dtype}")
    return _window(window).apply(arr)


@register_step("window")
def rewindow(
    image: np.ndarray,
    *,
    window: str | Sequence[float] | Window = "kidney",
    source: str | Sequence[float] | Window = "abdomen",
) -> np.ndarray:
    """Re-window an already windowed [0, 1] image (e.g. a CT-KIDNEY JPEG) to another CT window.

    The image is mapped back to HU through ``source`` (the window it was exported with;
    CT-KIDNEY uses roughly W 400 / L 40) and forward through ``window``. HU outside the
    source window were clipped at export and cannot be recovered.

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1].
    window, source
        Names from :data:`WINDOWS`, :class:`~kidneyscan.data.windows.Window` objects or
        ``(level, width)`` in HU.
    """
    img = as_image(image)
    src = _window(source)
    hu = img * src.width + src.low
    return window_ct(hu, window=window)


@register_step("equalize")
def equalize_hist(image: np.ndarray, *, nbins: int = 256) -> np.ndarray:
    """Global histogram equalisation (:func:`skimage.exposure.equalize_hist`)."""
    img = as_image(image)
    return exposure.equalize_hist(img, nbins=int(nbins)).astype(np.float32)


@register_step("clahe")
def equalize_clahe(
    image: np.ndarray, *, clip_limit: float = 2.0, tiles: int = 8, levels: int = 4096
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV, 12-bit quantised).

    OpenCV's CLAHE is ~10x faster than scikit-image's and runs on every training image, so
    the float image is quantised to ``levels`` grey levels (4096 keeps CT detail) first.

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1].
    clip_limit
        OpenCV clip limit (histogram bins are clipped at ``clip_limit`` times the mean).
    tiles
        Number of tiles per side of the contextual grid.
    levels
        Grey levels used for the histogram (2..65536).
    """
    img = as_image(image)
    positive(clip_limit, name="clip_limit")
    if not 1 <= int(tiles) <= min(img.shape):
        raise ValueError(f"tiles must be in [1, {min(img.shape)}], got {tiles}")
    if not 2 <= int(levels) <= 65536:
        raise ValueError(f"levels must be in [2, 65536], got {levels}")
    q = np.round(img * (levels - 1)).astype(np.uint16)
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tiles), int(tiles)))
    # OpenCV builds a 65536-bin histogram for uint16, so spread the levels over the full range.
    scale = 65535 // (levels - 1)
    out = clahe.apply(q * np.uint16(scale)).astype(np.float32) / float(scale * (levels - 1))
    return np.clip(out, 0.0, 1.0)


def reference_quantiles(reference: np.ndarray, *, n: int = 256) -> list[float]:
    """The ``n`` evenly spaced quantiles of a reference image, for :func:`match_histogram`.

    Storing quantiles (not the image) keeps a histogram-matching pipeline step JSON-sized.
    """
    ref = as_image(reference, name="reference")
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    return [float(v) for v in np.quantile(ref, np.linspace(0.0, 1.0, n))]


@register_step("match_histogram")
def match_histogram(image: np.ndarray, *, reference: np.ndarray | Sequence[float]) -> np.ndarray:
    """Histogram matching to a reference image or to its quantiles.

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1].
    reference
        A reference image (float in [0, 1]; uses :func:`skimage.exposure.match_histograms`) or
        a non-decreasing list of its evenly spaced quantiles from :func:`reference_quantiles`
        (the JSON-friendly form used in pipelines).
    """
    img = as_image(image)
    ref = np.asarray(reference, dtype=np.float32)
    if ref.ndim == 2:
        ref = as_image(ref, name="reference")
        return exposure.match_histograms(img, ref).astype(np.float32)
    if ref.ndim != 1 or ref.size < 2 or np.any(np.diff(ref) < 0):
        raise ValueError("reference must be a 2-D image or a non-decreasing list of quantiles")
    if ref.min() < 0 or ref.max() > 1:
        raise ValueError("reference quantiles must lie in [0, 1]")
    # Same mapping as skimage.match_histograms: each unique source value's cumulative
    # quantile -> the reference value at that quantile (equal pixels stay equal).
    values, inverse, counts = np.unique(img.ravel(), return_inverse=True, return_counts=True)
    src_q = np.cumsum(counts) / img.size
    mapped = np.interp(src_q, np.linspace(0.0, 1.0, ref.size), ref)
    return mapped[inverse].reshape(img.shape).astype(np.float32)


@register_step("stretch")
def stretch_contrast(image: np.ndarray, *, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Linear contrast stretch: the ``low``..``high`` percentiles map to 0..1.

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1].
    low, high
        Percentiles in [0, 100], ``low < high``. A flat image is returned unchanged.
    """
    img = as_image(image)
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    p_lo, p_hi = np.percentile(img, (low, high))
    if p_hi <= p_lo:
        return img.copy()
    out = exposure.rescale_intensity(img, in_range=(p_lo, p_hi), out_range=(0.0, 1.0))
    return out.astype(np.float32)


@register_step("gamma")
def adjust_gamma(image: np.ndarray, *, gamma: float = 1.0, gain: float = 1.0) -> np.ndarray:
    """Power-law transform ``gain * image ** gamma`` (:func:`skimage.exposure.adjust_gamma`)."""
    img = as_image(image)
    positive(gamma, name="gamma")
    positive(gain, name="gain")
    out = exposure.adjust_gamma(img, gamma=float(gamma), gain=float(gain))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def apply_kernel(
    image: np.ndarray,
    kernel: np.ndarray | Sequence[Sequence[float]],
    *,
    mode: Literal["correlate", "convolve"] = "correlate",
) -> np.ndarray:
    """Spatial correlation or convolution with a small kernel (OpenCV ``filter2D``).

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1].
    kernel
        2-D array with odd side lengths.
    mode
        ``"correlate"`` slides the kernel as is; ``"convolve"`` flips it first. Borders use
        reflection.

    Returns
    -------
    numpy.ndarray
        float32 (H, W), clipped to [0, 1].
    """
    img = as_image(image)
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError(f"kernel must be 2-D with odd sides, got shape {k.shape}")
    if mode not in ("correlate", "convolve"):
        raise ValueError(f"mode must be 'correlate' or 'convolve', got {mode!r}")
    if mode == "convolve":
        k = k[::-1, ::-1].copy()
    out = cv2.filter2D(img, cv2.CV_32F, k, borderType=cv2.BORDER_REFLECT101)
    return np.clip(out, 0.0, 1.0)


#: 4-neighbour Laplacian (negative centre).
LAPLACIAN_KERNEL = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32)


def laplacian(image: np.ndarray) -> np.ndarray:
    """Laplacian edge response (OpenCV), mapped to [0, 1] with 0.5 as "no edge".

    Returns ``clip(0.5 + 0.5 * lap / max|lap|)``; a flat image gives 0.5 everywhere.
    """
    img = as_image(image)
    lap = cv2.Laplacian(img, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT101)
    peak = float(np.abs(lap).max())
    if peak == 0:
        return np.full_like(img, 0.5)
    return np.clip(0.5 + 0.5 * lap / peak, 0.0, 1.0).astype(np.float32)


@register_step("sharpen")
def sharpen_laplacian(image: np.ndarray, *, amount: float = 1.0) -> np.ndarray:
    """Laplacian sharpening ``image - amount * laplacian(image)`` (one ``filter2D`` kernel)."""
    img = as_image(image)
    if amount < 0:
        raise ValueError(f"amount must be >= 0, got {amount}")
    identity = np.zeros((3, 3), np.float32)
    identity[1, 1] = 1.0
    return apply_kernel(img, identity - float(amount) * LAPLACIAN_KERNEL)


@register_step("unsharp")
def unsharp_mask(image: np.ndarray, *, radius: float = 2.0, amount: float = 1.0) -> np.ndarray:
    """Unsharp masking (:func:`skimage.filters.unsharp_mask`), clipped to [0, 1]."""
    img = as_image(image)
    positive(radius, name="radius")
    if amount < 0:
        raise ValueError(f"amount must be >= 0, got {amount}")
    out = filters.unsharp_mask(img, radius=float(radius), amount=float(amount))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@register_step("smooth_mean")
def smooth_mean(image: np.ndarray, *, size: int = 3) -> np.ndarray:
    """Box (arithmetic-mean) smoothing over a ``size`` x ``size`` window (OpenCV ``blur``)."""
    img = as_image(image)
    s = odd_size(size)
    return cv2.blur(img, (s, s), borderType=cv2.BORDER_REFLECT101)


@register_step("smooth_gaussian")
def smooth_gaussian(image: np.ndarray, *, sigma: float = 1.0) -> np.ndarray:
    """Gaussian smoothing with standard deviation ``sigma`` pixels (OpenCV)."""
    img = as_image(image)
    positive(sigma, name="sigma")
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT101)


@register_step("smooth_median")
def smooth_median(image: np.ndarray, *, size: int = 3) -> np.ndarray:
    """Median smoothing over a ``size`` x ``size`` window (SciPy; any odd size, float-exact)."""
    img = as_image(image)
    s = odd_size(size)
    return ndi.median_filter(img, size=s, mode="reflect").astype(np.float32)


@register_step("smooth_bilateral")
def smooth_bilateral(
    image: np.ndarray, *, diameter: int = 5, sigma_color: float = 0.1, sigma_space: float = 2.0
) -> np.ndarray:
    """Edge-preserving bilateral filter (OpenCV); ``sigma_color`` is in [0, 1] intensity units."""
    img = as_image(image)
    if int(diameter) < 1:
        raise ValueError(f"diameter must be >= 1, got {diameter}")
    positive(sigma_color, name="sigma_color")
    positive(sigma_space, name="sigma_space")
    out = cv2.bilateralFilter(img, int(diameter), float(sigma_color), float(sigma_space))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def frequency_response(
    shape: tuple[int, int],
    *,
    pass_type: Literal["lowpass", "highpass"] = "lowpass",
    kind: Literal["ideal", "butterworth", "gaussian"] = "gaussian",
    cutoff: float = 0.1,
    order: int = 2,
) -> np.ndarray:
    """Centred transfer function ``H(u, v)`` for an FFT filter.

    Parameters
    ----------
    shape
        (rows, cols) of the (padded) spectrum.
    pass_type
        ``"lowpass"`` or ``"highpass"`` (``1 - lowpass``).
    kind
        ``"ideal"`` (hard cut), ``"butterworth"`` (``1 / (1 + (D/D0)^(2n))``) or
        ``"gaussian"`` (``exp(-D^2 / (2 D0^2))``).
    cutoff
        ``D0`` as a fraction of the sampling frequency (0 < cutoff <= 0.5).
    order
        Butterworth order ``n``.
    """
    if not 0 < cutoff <= 0.5:
        raise ValueError(f"cutoff must be in (0, 0.5] cycles/pixel, got {cutoff}")
    if int(order) < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    fy = np.fft.fftshift(np.fft.fftfreq(shape[0]))[:, None]
    fx = np.fft.fftshift(np.fft.fftfreq(shape[1]))[None, :]
    d = np.sqrt(fy**2 + fx**2)
    if kind == "ideal":
        low = (d <= cutoff).astype(np.float64)
    elif kind == "butterworth":
        low = 1.0 / (1.0 + (d / cutoff) ** (2 * int(order)))
    elif kind == "gaussian":
        low = np.exp(-(d**2) / (2.0 * cutoff**2))
    else:
        raise ValueError(f"kind must be ideal, butterworth or gaussian, got {kind!r}")
    if pass_type == "lowpass":
        return low
    if pass_type == "highpass":
        return 1.0 - low
    raise ValueError(f"pass_type must be 'lowpass' or 'highpass', got {pass_type!r}")


@register_step("fft_filter")
def filter_frequency(
    image: np.ndarray,
    *,
    pass_type: Literal["lowpass", "highpass"] = "lowpass",
    kind: Literal["ideal", "butterworth", "gaussian"] = "gaussian",
    cutoff: float = 0.1,
    order: int = 2,
    boost: float | None = None,
) -> np.ndarray:
    """Frequency-domain low-pass or high-pass filtering (NumPy FFT, reflect-padded).

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1].
    pass_type, kind, cutoff, order
        See :func:`frequency_response`.
    boost
        High-pass only. ``None`` returns the high-pass response centred at 0.5 (for
        display); a number ``k`` returns high-frequency emphasis ``image + k * highpass``
        (a sharpening filter).

    Returns
    -------
    numpy.ndarray
        float32 (H, W) clipped to [0, 1].
    """
    img = as_image(image)
    # Reflect-pad by half a side so the FFT's implied periodicity does not bleed the left
    # border into the right one (wrap-around ringing).
    ph, pw = img.shape[0] // 2, img.shape[1] // 2
    padded = np.pad(img.astype(np.float64), ((ph, ph), (pw, pw)), mode="reflect")
    h = frequency_response(padded.shape, pass_type=pass_type, kind=kind, cutoff=cutoff, order=order)
    spec = np.fft.fftshift(np.fft.fft2(padded))
    filtered = np.real(np.fft.ifft2(np.fft.ifftshift(spec * h)))
    out = filtered[ph : ph + img.shape[0], pw : pw + img.shape[1]]
    if pass_type == "highpass":
        out = 0.5 + out if boost is None else img + float(boost) * out
    elif boost is not None:
        raise ValueError("boost applies to pass_type='highpass' only")
    return np.clip(out, 0.0, 1.0).astype(np.float32)
