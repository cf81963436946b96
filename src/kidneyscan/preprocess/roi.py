"""Kidney region of interest: crop a slice to the band that holds both kidneys.

Stones are a few pixels wide once a 512 px slice is shrunk to a network's input; cropping to
the kidneys first keeps several times more pixels on them. The kidneys are found through the
one landmark that is reliable on every axial slice at kidney level: the vertebral body, the
largest bone-bright blob in the posterior centre of the body. Both kidneys lie beside it, so a
fixed box around it (:data:`BAND`, measured on the public CT-KIDNEY slices: 150 px to each side
of its centre, 130 px above its anterior edge, 70 px below, on a 512 px slice) holds both on
nearly every slice. When no vertebra is found the whole body is used instead, and the caller
is told so (``source == "body"``).

:func:`kidney_band_box` returns the box (every prediction reports it), :func:`crop_kidney_band`
is the pipeline step. The search runs on a copy resized to :data:`SEARCH_SIDE` px: the box needs
a few pixels of precision, not the full resolution, it keeps the step cheap (about 10 ms) and
the morphology the same for 64 px phantoms and 512 px scans.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import measure

from kidneyscan.preprocess._checks import as_image
from kidneyscan.preprocess.pipeline import register_step
from kidneyscan.preprocess.segment import body_mask

log = logging.getLogger(__name__)

#: The kidney band on a 512 px slice (pixels): half width, above the vertebra's anterior edge,
#: below it. Stored as fractions of the slice side so it scales with the image.
BAND: dict[str, float] = {"half_width": 150 / 512, "above": 130 / 512, "below": 70 / 512}
#: Side of the shrunk copy the vertebra is searched on.
SEARCH_SIDE = 256
#: Bone level in the soft-tissue window (W400/L40: 0.8 is 160 HU; cortical bone is 700 HU and
#: more, cancellous bone 200-400 HU). On the 1,000 real slices 0.8 found the most vertebrae
#: (0.9: 49 missed, 0.8: 13; lower levels merge the vertebra with contrast-filled vessels).
BONE_LEVEL = 0.8
_DISK5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


@dataclass(frozen=True)
class RoiBox:
    """A crop box in pixels of the image it was found on, and how it was found.

    ``source`` is ``"spine"`` (vertebra found, the kidney band), ``"body"`` (fallback: the
    body's bounding box) or ``"full"`` (no body either: the whole image).
    """

    top: int
    left: int
    bottom: int
    right: int
    source: str

    def as_tuple(self) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)``."""
        return self.top, self.left, self.bottom, self.right

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what predictions report)."""
        return asdict(self)


def _square(
    top: float, left: float, bottom: float, right: float, shape: tuple[int, int], margin: float
) -> tuple[int, int, int, int]:
    h, w = shape
    side = max(bottom - top, right - left)
    side = int(min(h, w, round(side * (1 + 2 * margin))))
    cy, cx = (top + bottom) / 2.0, (left + right) / 2.0
    t = int(np.clip(round(cy - side / 2), 0, h - side))
    lft = int(np.clip(round(cx - side / 2), 0, w - side))
    return t, lft, t + side, lft + side


def body_box(image: np.ndarray, *, margin: float = 0.03) -> tuple[int, int, int, int]:
    """Square box ``(top, left, bottom, right)`` around the body (air and table excluded).

    The whole image when no body is found.
    """
    img = as_image(image)
    body = body_mask(img)
    if not body.any():
        return 0, 0, img.shape[0], img.shape[1]
    rows, cols = np.nonzero(body)
    return _square(rows.min(), cols.min(), rows.max() + 1, cols.max() + 1, img.shape, margin)


@register_step("crop_body")
def crop_body(image: np.ndarray, *, margin: float = 0.03) -> np.ndarray:
    """Crop to a square around the body, dropping air and the scanner table.

    Robust on real CT-KIDNEY slices (the body is the largest bright component) and a
    1.2-1.5x zoom for typical slices. Returns the crop, not resized.
    """
    img = as_image(image)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    t, lft, b, r = body_box(img, margin=margin)
    return np.ascontiguousarray(img[t:b, lft:r])


def find_vertebra(image: np.ndarray) -> tuple[float, float, float, float] | None:
    """The vertebral body of an axial slice: ``(anterior, centre_col, posterior, area_fraction)``.

    The largest bone-bright blob (above :data:`BONE_LEVEL`, ring gaps closed, holes filled)
    whose centre lies in the posterior 60 % of the body within a quarter of its half width of
    the midline, and which is not a long arc (the table, a rib). Its anterior edge is taken on
    the blob's middle fifth of columns, so an aorta touching it from the side does not lift it.

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1], soft-tissue window (any size; searched at
        :data:`SEARCH_SIDE` px).

    Returns
    -------
    tuple or None
        Anterior edge row, centre column and posterior edge row in pixels of ``image``, and
        the blob's area as a fraction of the body's; ``None`` when no blob of at least 0.4 %
        of the body qualifies (or no body is found).
    """
    img = as_image(image)
    h, w = img.shape
    # One working size for every input, so the morphology below means the same anatomy.
    scale = SEARCH_SIDE / max(h, w)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=interp)
    body = body_mask(small)
    if not body.any():
        return None
    rows, cols = np.nonzero(body)
    top, bottom = rows.min(), rows.max()
    mid = (cols.min() + cols.max()) / 2.0
    half_w = max(1.0, (cols.max() - cols.min()) / 2.0)
    height = max(1.0, float(bottom - top))
    bone = ((small > BONE_LEVEL) & body).astype(np.uint8)
    # Thin cortex with gaps around dimmer cancellous bone: close the ring, then fill it.
    bone = cv2.morphologyEx(bone, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    labels = measure.label(ndi.binary_fill_holes(bone))
    best = None
    for reg in measure.regionprops(labels):
        cy, cx = reg.centroid
        r0, c0, r1, c1 = reg.bbox
        if abs(cx - mid) / half_w > 0.25 or cy < top + 0.4 * height:
            continue
        if (c1 - c0) > 3 * (r1 - r0) or (r1 - r0) > 3 * (c1 - c0):
            continue
        if best is None or reg.area > best.area:
            best = reg
    body_area = float(body.sum())
    if best is None or best.area < 0.004 * body_area:
        return None
    blob = labels == best.label
    # An opening cuts thin bridges (pedicles, a vessel wall touching the vertebral body): the
    # largest piece left is the vertebral body with what is thickly attached to it.
    core = cv2.morphologyEx(blob.astype(np.uint8), cv2.MORPH_OPEN, _DISK5)
    pieces = measure.label(core)
    if pieces.max() > 0:
        blob = pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
    rows_b, cols_b = np.nonzero(blob)
    # The centre column: that of the largest disk inside the blob, which lies in the vertebral
    # body (the thickest bone; a merged aorta, bowel loop or the posterior arch is thinner).
    dist = cv2.distanceTransform(blob.astype(np.uint8), cv2.DIST_L2, 5)
    cx = float(np.unravel_index(int(np.argmax(dist)), dist.shape)[1])
    # The anterior edge on a narrow strip there: the aorta lies anterior and to the left of
    # the vertebral body, so a contrast-filled aorta merged with it does not lift the edge.
    q = max(1, (cols_b.max() + 1 - cols_b.min()) // 10)
    strip = blob[:, max(0, int(cx) - q) : int(cx) + q + 1].any(axis=1)
    anterior = int(np.argmax(strip))
    return anterior / scale, cx / scale, (rows_b.max() + 1) / scale, float(best.area / body_area)


def _fit(start: float, length: int, limit: int) -> int:
    """Start of a span of ``length`` moved inside ``[0, limit)`` (clipped if longer)."""
    return int(np.clip(round(start), 0, max(0, limit - length)))


def kidney_band_box(
    image: np.ndarray,
    *,
    half_width: float = BAND["half_width"],
    above: float = BAND["above"],
    below: float = BAND["below"],
) -> RoiBox:
    """Box around both kidneys, anchored on the vertebral body (see the module docstring).

    Parameters
    ----------
    image
        float32 (H, W) in [0, 1], soft-tissue window.
    half_width, above, below
        Box extent as fractions of the image width (``half_width``, each side of the
        vertebra's centre) and height (``above`` / ``below`` its anterior edge).

    Returns
    -------
    RoiBox
        ``source == "spine"``: the band, shifted to lie inside the image; ``"body"``: no
        vertebra found, the body's bounding box widened to the band's aspect ratio (logged);
        ``"full"``: not even a body, the whole image.
    """
    img = as_image(image)
    h, w = img.shape
    for name, v in (("half_width", half_width), ("above", above), ("below", below)):
        if not 0 < v <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {v}")
    bw, bh = min(w, round(2 * half_width * w)), min(h, round((above + below) * h))
    vert = find_vertebra(img)
    if vert is not None:
        anterior, centre, _, _ = vert
        t = _fit(anterior - above * h, bh, h)
        lft = _fit(centre - bw / 2, bw, w)
        return RoiBox(t, lft, t + bh, lft + bw, "spine")
    body = body_mask(img)
    if not body.any():
        log.warning("kidney band: no body found; using the whole image")
        return RoiBox(0, 0, h, w, "full")
    rows, cols = np.nonzero(body)
    t0, b0, l0, r0 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    # Keep the band's aspect ratio so the crop is not distorted when resized.
    aspect = bw / bh
    bh2 = min(h, int(max(b0 - t0, (r0 - l0) / aspect)))
    bw2 = min(w, int(round(bh2 * aspect)))
    t = _fit((t0 + b0 - bh2) / 2, bh2, h)
    lft = _fit((l0 + r0 - bw2) / 2, bw2, w)
    log.warning("kidney band: no vertebra found; using the body box (whole body)")
    return RoiBox(t, lft, t + bh2, lft + bw2, "body")


@register_step("crop_kidney_band", box=kidney_band_box)
def crop_kidney_band(
    image: np.ndarray,
    *,
    half_width: float = BAND["half_width"],
    above: float = BAND["above"],
    below: float = BAND["below"],
) -> np.ndarray:
    """Crop to the kidney band (:func:`kidney_band_box`): both kidneys, spine-anchored.

    Returns the crop, not resized (about 300 x 200 px of a 512 px slice; the pipeline then
    resizes it to the model's input, 336 x 224 by default).
    """
    t, lft, b, r = kidney_band_box(
        image, half_width=half_width, above=above, below=below
    ).as_tuple()
    return np.ascontiguousarray(as_image(image)[t:b, lft:r])
