"""Read the CT-KIDNEY layout (or any ImageFolder-style tree) into samples and images.

Images are returned as float32 arrays of shape (H, W) in [0, 1]: the public JPEGs store grayscale
as three equal channels, so they are loaded as one channel; models that want three channels get
them expanded by :class:`kidneyscan.preprocess.pipeline.Preprocessor`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

#: Class names in the order of the CT-KIDNEY ``target`` codes (Cyst 0, Normal 1, Stone 2, Tumor 3).
CLASSES: tuple[str, ...] = ("Cyst", "Normal", "Stone", "Tumor")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm")

_INDEX_RE = re.compile(r"\((\d+)\)")


class DataError(ValueError):
    """A data file or folder is unusable; the message names the path and the reason."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: where it is, its label and what we know of its origin."""

    path: Path
    label: int
    class_name: str
    image_id: str
    index: int | None = None  # number in ``Cyst- (1219)``: neighbouring numbers ~ same patient
    site: str | None = None


def parse_index(name: str) -> int | None:
    """Return the slice number in a CT-KIDNEY file name such as ``Cyst- (1219).jpg``."""
    m = _INDEX_RE.search(name)
    return int(m.group(1)) if m else None


def load_image(path: str | Path) -> np.ndarray:
    """Load a PNG/JPEG (or DICOM) file as a float32 (H, W) image in [0, 1].

    Raises
    ------
    DataError
        If the file is missing or cannot be decoded; the message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    if p.suffix.lower() == ".dcm" or _is_dicom(p):
        from kidneyscan.data.dicom import load_dicom_image

        return load_dicom_image(p)
    try:
        with Image.open(p) as im:
            im.load()
            return image_to_float(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{p}: unreadable image ({exc})") from exc


def image_to_float(im: Image.Image) -> np.ndarray:
    """Convert a PIL image to float32 (H, W) in [0, 1] (luminance for colour images)."""
    if im.mode in ("I;16", "I;16B", "I"):
        arr = np.asarray(im, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        return np.clip(arr / hi, 0.0, 1.0).astype(np.float32)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _is_dicom(p: Path) -> bool:
    try:
        with p.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def class_index(name: str, classes: tuple[str, ...] = CLASSES) -> int:
    """Case-insensitive class lookup (``CYST`` and ``Cyst`` are the same class)."""
    lowered = [c.lower() for c in classes]
    try:
        return lowered.index(name.strip().lower())
    except ValueError:
        raise DataError(f"unknown class {name!r}; expected one of {', '.join(classes)}") from None


def scan_dataset(root: str | Path, classes: tuple[str, ...] = CLASSES) -> list[Sample]:
    """List the images of a CT-KIDNEY / ImageFolder tree: one sub-folder per class.

    Only the folder walk is done here; see the module docstring for the data contract.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    samples: list[Sample] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = class_index(sub.name, classes)
        files = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{sub}: class folder {sub.name!r} holds no images")
        for f in files:
            samples.append(Sample(f, label, classes[label], f.stem, parse_index(f.name), site=None))
    if not samples:
        raise DataError(f"{root}: no class folders with images")
    return samples


def samples_summary(samples: list[Sample], classes: tuple[str, ...] = CLASSES) -> dict[str, Any]:
    """Counts per class, for logs and reports."""
    counts = {c: 0 for c in classes}
    for s in samples:
        counts[s.class_name] += 1
    return {"n": len(samples), "per_class": counts}
