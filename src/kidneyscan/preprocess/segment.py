"""Segmentation: thresholds, k-means, region growing, watershed, edges; kidney and lesion masks.

The generic functions take a float32 (H, W) image in [0, 1] and return bool masks or int
label images. :func:`segment_kidneys` and :func:`segment_lesions` turn each generic method
into a kidney / lesion mask for an axial abdominal CT slice in a soft-tissue window, using
an anatomical prior (kidneys are compact soft-tissue blobs left and right of the spine in the
posterior half of the body, wrapped in fat); they are what the benchmark scores against the
phantom's masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, segmentation
from sklearn.cluster import KMeans

from kidneyscan.preprocess._checks import as_image, as_mask
from kidneyscan.preprocess.morphology import closing, opening

Method = Literal["threshold", "otsu", "kmeans", "region_growing", "watershed", "edges"]
METHODS: tuple[str, ...] = ("threshold", "otsu", "kmeans", "region_growing", "watershed", "edges")


# --------------------------------------------------------------------------- generic methods
def threshold_global(image: np.ndarray, *, level: float = 0.5) -> np.ndarray:
    """Global threshold: ``image > level`` as a bool mask."""
    img = as_image(image)
    if not 0 <= level <= 1:
        raise ValueError(f"level must be in [0, 1], got {level}")
    return img > level


def threshold_otsu(image: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray:
    """Otsu threshold (:func:`skimage.filters.threshold_otsu`), optionally computed inside ``mask``.

    A constant image (no threshold exists) gives an all-False mask.
    """
    img = as_image(image)
    values = img[as_mask(mask)] if mask is not None else img.ravel()
    if values.size == 0 or values.min() == values.max():
        return np.zeros(img.shape, dtype=bool)
    return img > filters.threshold_otsu(values)


def segment_kmeans(
    image: np.ndarray, *, k: int = 3, mask: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """k-means clustering of intensities (scikit-learn), labels ordered by cluster centre.

    Returns
    -------
    numpy.ndarray
        int32 (H, W): ``0`` outside ``mask``; inside it ``1..k`` from the darkest to the
        brightest cluster (ordered so labels mean the same thing on every image).
    """
    img = as_image(image)
    m = np.ones(img.shape, bool) if mask is None else as_mask(mask)
    values = img[m].reshape(-1, 1)
    if int(k) < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    labels = np.zeros(img.shape, dtype=np.int32)
    if len(np.unique(values)) < k:
        return labels + m.astype(np.int32)
    # Subsample for speed; the 1-D centres of 5k pixels match those of all pixels closely.
    rng = np.random.default_rng(seed)
    fit = values if len(values) <= 5000 else values[rng.choice(len(values), 5000, False)]
    km = KMeans(n_clusters=int(k), n_init=1, random_state=seed).fit(fit)
    rank = np.argsort(np.argsort(km.cluster_centers_.ravel()))
    labels[m] = rank[km.predict(values)] + 1
    return labels


def region_grow(
    image: np.ndarray, seeds: Sequence[tuple[int, int]], *, tolerance: float = 0.08
) -> np.ndarray:
    """Region growing: union of flood fills from ``seeds`` (:func:`skimage.segmentation.flood`).

    A pixel joins a seed's region when it is 8-connected to it and within ``tolerance`` of
    the seed's intensity.
    """
    img = as_image(image)
    out = np.zeros(img.shape, dtype=bool)
    for r, c in seeds:
        if not (0 <= r < img.shape[0] and 0 <= c < img.shape[1]):
            raise ValueError(f"seed {(r, c)} lies outside the image of shape {img.shape}")
        out |= segmentation.flood(img, (int(r), int(c)), tolerance=float(tolerance))
    return out


def segment_watershed(image: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Marker-based watershed on the Sobel gradient (:func:`skimage.segmentation.watershed`).

    Parameters
    ----------
    markers
        int (H, W) array: 0 = unknown, positive labels = seeds.

    Returns
    -------
    numpy.ndarray
        int32 label image; every pixel gets the label of the basin that floods it.
    """
    img = as_image(image)
    mk = np.asarray(markers)
    if mk.shape != img.shape:
        raise ValueError(f"markers shape {mk.shape} differs from image shape {img.shape}")
    return segmentation.watershed(filters.sobel(img), mk.astype(np.int32)).astype(np.int32)


def segment_edges(
    image: np.ndarray,
    *,
    detector: Literal["canny", "sobel"] = "canny",
    sigma: float = 2.0,
) -> np.ndarray:
    """Edge-based segmentation: Canny (or Otsu-thresholded Sobel) edges, closed, holes filled.

    Returns the bool mask of regions enclosed by edges.
    """
    img = as_image(image)
    if detector == "canny":
        edges = feature.canny(img, sigma=float(sigma))
    elif detector == "sobel":
        mag = filters.sobel(filters.gaussian(img, sigma=float(sigma)))
        band = mag > filters.threshold_otsu(mag) if mag.max() > mag.min() else mag > 1
        # Thresholded gradients are bands several pixels thick; thin them to centre lines
        # so the filled region ends on the edge, not outside it.
        edges = morphology.thin(band)
    else:
        raise ValueError(f"detector must be 'canny' or 'sobel', got {detector!r}")
    closed = closing(edges, shape="disk", radius=1)
    filled = ndi.binary_fill_holes(closed)
    # The filled interiors are the segments; the edge pixels themselves are boundary.
    return np.asarray(filled & ~(edges & ~ndi.binary_fill_holes(edges)), dtype=bool)


# ------------------------------------------------------------------ anatomy: body and kidneys
def body_mask(image: np.ndarray, *, level: float = 0.03) -> np.ndarray:
    """The patient's body: largest component above air level, holes filled, table removed.

    A closing (disk of ~2 % of the image side) and hole filling come first: some scans'
    windows show fat as black, and only the skin outline and the organs then outline the body.
    An opening with the same disk then detaches the thin scanner table. OpenCV's morphology
    keeps this at a few milliseconds for a 256 px image.
    """
    img = as_image(image)
    r = max(1, round(img.shape[0] * 0.02))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    fg: np.ndarray = (cv2.GaussianBlur(img, (0, 0), 1.0) > level).astype(np.uint8)
    fg = np.asarray(cv2.morphologyEx(fg, cv2.MORPH_CLOSE, disk))
    fg = ndi.binary_fill_holes(fg).astype(np.uint8)
    fg = np.asarray(cv2.morphologyEx(fg, cv2.MORPH_OPEN, disk))
    lab = measure.label(fg)
    if lab.max() == 0:
        return np.zeros(img.shape, dtype=bool)
    largest = np.argmax(np.bincount(lab.ravel())[1:]) + 1
    return ndi.binary_fill_holes(lab == largest)


def _kidney_candidates(img: np.ndarray, body: np.ndarray, method: str, seed: int) -> np.ndarray:
    """Soft-tissue-like regions (not fat, not air) by the requested generic method."""
    smooth = filters.gaussian(img, sigma=max(1.0, img.shape[0] / 128))
    # Drop the outer rim (skin, body-wall muscle) so kidneys do not fuse with it.
    inside = ndi.binary_erosion(body, iterations=max(1, img.shape[0] // 40))
    if method == "threshold":
        cand = threshold_global(smooth, level=0.35)
    elif method == "otsu":
        cand = threshold_otsu(smooth, mask=inside)
    elif method == "kmeans":
        cand = segment_kmeans(smooth, k=3, mask=inside, seed=seed) >= 2
    elif method == "region_growing":
        base = threshold_otsu(smooth, mask=inside) & inside
        seeds = _blob_seeds(base, body, smooth)
        cand = region_grow(smooth, seeds, tolerance=0.12) if seeds else base
    elif method == "watershed":
        # Split touching organs: markers at the distance-transform peaks of the Otsu tissue
        # mask (one per convex lobe), watershed of the inverted distance; the kidney lobe
        # then detaches from the back muscles it touches.
        tissue = threshold_otsu(smooth, mask=inside) & inside
        dist = ndi.distance_transform_edt(tissue)
        peaks = feature.peak_local_max(
            dist, min_distance=max(3, img.shape[0] // 32), labels=measure.label(tissue)
        )
        markers = np.zeros(img.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        lobes = segmentation.watershed(-dist, markers, mask=tissue)
        cand = np.zeros(img.shape, dtype=bool)
        # Lobes are separated by 1-px cuts so that labelling keeps them apart.
        boundaries = segmentation.find_boundaries(lobes, mode="inner")
        cand = (lobes > 0) & ~boundaries
        picked = _select_kidneys(cand, body, image=img, open_radius=0)
        return ndi.binary_dilation(picked, iterations=1) & tissue
    elif method == "edges":
        # Canny edges partition the slice; the regions they enclose (the edge-free
        # components) are the candidates, grown back by the edge width.
        edges = feature.canny(img, sigma=max(1.0, img.shape[0] / 128))
        regions = measure.label(~edges, connectivity=1)
        regions[~inside] = 0
        cand = np.zeros(img.shape, dtype=bool)
        for reg in measure.regionprops(regions, intensity_image=smooth):
            # Soft tissue (not fat) and not the large viscera region, which 8-connected
            # labelling would otherwise fuse with the kidneys across 1-px edge lines.
            if reg.intensity_mean > 0.3 and reg.area <= 0.08 * body.sum():
                cand[regions == reg.label] = True
        picked = _select_kidneys(cand, body, image=img, open_radius=0)
        return ndi.binary_dilation(picked, iterations=1) & inside
    else:
        raise ValueError(f"unknown segmentation method {method!r}; known: {', '.join(METHODS)}")
    return cand & inside


def _blob_seeds(mask: np.ndarray, body: np.ndarray, image: np.ndarray) -> list[tuple[int, int]]:
    """Seeds for region growing: one deep, typical-intensity pixel per kidney-like blob."""
    picked = _select_kidneys(mask, body, image=image)
    seeds = []
    for region in measure.regionprops(measure.label(picked), intensity_image=image):
        dist = ndi.distance_transform_edt(region.image)
        vals = region.image_intensity
        # Deep inside the blob AND close to its median intensity: not on a stone or cyst.
        typical = np.abs(vals - np.median(vals[region.image])) < 0.05
        r, c = np.unravel_index(np.argmax(dist * typical), dist.shape)
        seeds.append((int(region.bbox[0] + r), int(region.bbox[1] + c)))
    return seeds


def _spine_depth(image: np.ndarray, body: np.ndarray) -> float:
    """Row of the vertebral body's centroid: the largest bright blob near the midline.

    Falls back to 75 % of the body height (where it lies on the phantom and on CT-KIDNEY
    slices) when no bone-bright blob is found (e.g. a cropped image).
    """
    rows, cols = np.nonzero(body)
    top, bottom = rows.min(), rows.max()
    mid = (cols.min() + cols.max()) / 2.0
    half_w = max(1.0, (cols.max() - cols.min()) / 2.0)
    fallback = top + 0.75 * (bottom - top)
    bone = measure.label((filters.gaussian(image, sigma=1.0) > 0.9) & body)
    best, best_area = fallback, 0.0
    for reg in measure.regionprops(bone):
        cy, cx = reg.centroid
        if (
            abs(cx - mid) / half_w < 0.15
            and cy > top + 0.5 * (bottom - top)
            and reg.area > best_area
        ):
            best, best_area = cy, reg.area
    return float(best) if best_area >= 0.002 * body.sum() else float(fallback)


def _select_kidneys(
    cand: np.ndarray,
    body: np.ndarray,
    *,
    image: np.ndarray | None = None,
    open_radius: int | None = None,
) -> np.ndarray:
    """Keep at most one kidney-like component per side of the body's midline.

    Kidneys lie at the level of the vertebral body (centroid within 15 % of the body
    height of the spine's), 20-65 % of the half body width from the midline, cover 1-10 %
    of the body and are compact (solidity >= 0.8). Candidates are opened with growing
    disks until a plausible blob detaches from its neighbours (muscles, bowel).
    """
    out = np.zeros(cand.shape, dtype=bool)
    if not body.any():
        return out
    rows, cols = np.nonzero(body)
    top, bottom = rows.min(), rows.max()
    mid = (cols.min() + cols.max()) / 2.0
    half_w = max(1.0, (cols.max() - cols.min()) / 2.0)
    height = max(1.0, float(bottom - top))
    body_area = float(body.sum())
    spine = _spine_depth(image, body) if image is not None else top + 0.75 * height
    base = max(1, round(cand.shape[0] / 100))
    radii = [open_radius] if open_radius is not None else [base, 2 * base, 3 * base]
    best: dict[int, tuple[float, np.ndarray]] = {}
    for r in radii:
        pieces = measure.label(opening(cand, shape="disk", radius=r) if r > 0 else cand)
        for reg in measure.regionprops(pieces):
            frac = reg.area / body_area
            cy, cx = reg.centroid
            lateral = abs(cx - mid) / half_w
            level = (cy - spine) / height
            if not (0.01 <= frac <= 0.1 and 0.2 <= lateral <= 0.65 and abs(level) <= 0.15):
                continue
            if reg.solidity < 0.8:
                continue
            score = (
                reg.solidity
                - abs(lateral - 0.45)
                - abs(level + 0.03)
                - 0.3 * abs(np.log(frac / 0.045))
            )
            side = int(cx > mid)
            if side not in best or score > best[side][0]:
                best[side] = (score, pieces == reg.label)
    for _, mask in best.values():
        out |= mask
    return ndi.binary_fill_holes(out)


def segment_kidneys(
    image: np.ndarray, *, method: Method = "watershed", seed: int = 0
) -> np.ndarray:
    """Kidney mask of an axial abdominal CT slice in a soft-tissue window.

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1] (soft-tissue window, e.g. W 400 / L 40).
    method
        Generic method that proposes soft-tissue regions: ``"threshold"`` (fixed level),
        ``"otsu"``, ``"kmeans"`` (3 clusters), ``"region_growing"`` (seeded from the Otsu
        proposal), ``"watershed"`` (marker-based on the Sobel gradient) or ``"edges"``
        (Canny + hole filling). The same anatomical selection then keeps at most one
        compact blob per side (see module docstring); holes (lesions) are filled.
    seed
        Random seed for k-means.

    Returns
    -------
    numpy.ndarray
        bool (H, W); all False when no kidney-like region is found.
    """
    img = as_image(image)
    body = body_mask(img)
    if not body.any():
        return np.zeros(img.shape, dtype=bool)
    cand = _kidney_candidates(img, body, method, seed)
    return _select_kidneys(cand, body, image=img)


def segment_lesions(
    image: np.ndarray,
    kidneys: np.ndarray,
    *,
    method: Method = "otsu",
    min_deviation: float = 0.08,
    seed: int = 0,
) -> np.ndarray:
    """Lesion mask inside given kidney masks: regions whose intensity departs from parenchyma.

    Works on the deviation map ``|smooth(image) - median(kidney)|`` so that dark lesions
    (cysts), bright ones (stones) and heterogeneous ones (tumours) are all "high".

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1].
    kidneys
        bool (H, W) kidney mask (from :func:`segment_kidneys` or ground truth).
    method
        How the deviation map is split (same names as :func:`segment_kidneys`).
    min_deviation
        Pixels deviating less than this from the parenchyma median are never lesion; stops
        Otsu / k-means from splitting healthy parenchyma when there is no lesion.
    """
    img = as_image(image)
    kid = as_mask(kidneys, name="kidneys")
    if kid.shape != img.shape:
        raise ValueError(f"kidneys shape {kid.shape} differs from image shape {img.shape}")
    out = np.zeros(img.shape, dtype=bool)
    if kid.sum() < 9:
        return out
    smooth = filters.gaussian(img, sigma=0.7)
    dev = np.abs(smooth - np.median(smooth[kid]))
    dev = np.where(kid, dev, 0.0).astype(np.float32)
    dev_n = np.clip(dev / max(float(dev.max()), 1e-6), 0, 1).astype(np.float32)
    if method == "threshold":
        cand = dev > 2.0 * min_deviation
    elif method == "otsu":
        cand = threshold_otsu(dev_n, mask=kid)
    elif method == "kmeans":
        cand = segment_kmeans(dev_n, k=2, mask=kid, seed=seed) == 2
    elif method == "region_growing":
        r, c = np.unravel_index(np.argmax(dev), dev.shape)
        cand = region_grow(
            np.where(kid, smooth, 0.0).astype(np.float32), [(int(r), int(c))], tolerance=0.1
        )
    elif method == "watershed":
        markers = np.zeros(img.shape, np.int32)
        markers[~kid] = 1
        markers[kid & (dev < 0.5 * min_deviation)] = 1
        markers[kid & (dev > 2.0 * min_deviation)] = 2
        cand = segment_watershed(smooth.astype(np.float32), markers) == 2
    elif method == "edges":
        cand = segment_edges(np.where(kid, smooth, 0.0).astype(np.float32), sigma=1.0)
        cand &= ndi.binary_erosion(kid, iterations=1)
    else:
        raise ValueError(f"unknown segmentation method {method!r}; known: {', '.join(METHODS)}")
    # Partial-volume pixels on the kidney outline deviate too; lesions are accepted only if
    # they reach one pixel inside, then regrown to the outline (geodesic dilation).
    core = ndi.binary_erosion(kid, iterations=1)
    out = cand & core & (dev > min_deviation)
    out = ndi.binary_dilation(out, iterations=1, mask=kid & (dev > min_deviation))
    return ndi.binary_fill_holes(out)
