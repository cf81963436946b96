"""Read the CT-KIDNEY layout (or any ImageFolder-style tree) into samples and images.

Layout: one sub-folder per class (names case-insensitive: ``CYST`` and ``Cyst`` are one class)
and, optionally, ``kidneyData.csv`` with the columns ``,image_id,path,diag,target,Class`` of the
public dataset (target codes Cyst 0, Normal 1, Stone 2, Tumor 3). When the csv exists it is the
list of images; otherwise every image file under each class folder is one sample. A ``site``
column (in the csv or in the phantom's ``phantom_metadata.csv``) fills :attr:`Sample.site`; the
phantom's ``patient_id`` fills :attr:`Sample.patient_id`.

Images are returned as float32 arrays of shape (H, W) in [0, 1]: the public JPEGs store grayscale
as three equal channels, so they are loaded as one channel; models that want three channels get
them expanded by :class:`kidneyscan.preprocess.pipeline.Preprocessor`.

Nothing is dropped silently: bad input raises :class:`DataError` naming the file and the reason,
and files that are deliberately left out (non-image files, images missing from the csv, folders
that are not classes) are counted in the log.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from kidneyscan.data.dicom import load_dicom_image
from kidneyscan.data.errors import DataError  # re-exported: most callers import it from here

log = logging.getLogger(__name__)

#: Class names in the order of the CT-KIDNEY ``target`` codes (Cyst 0, Normal 1, Stone 2, Tumor 3).
CLASSES: tuple[str, ...] = ("Cyst", "Normal", "Stone", "Tumor")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm")
#: The index csv of the public dataset.
CSV_NAME = "kidneyData.csv"
#: Side-car metadata csv files whose ``site`` / ``patient_id`` columns are joined to samples.
METADATA_NAMES: tuple[str, ...] = ("phantom_metadata.csv",)

_INDEX_RE = re.compile(r"\((\d+)\)")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: where it is, its label and what we know of its origin."""

    path: Path
    label: int
    class_name: str
    image_id: str
    index: int | None = None  # number in ``Cyst- (1219)``: neighbouring numbers ~ same patient
    site: str | None = None
    patient_id: str | None = None  # known only for synthetic data (the phantom)


def parse_index(name: str) -> int | None:
    """Return the slice number in a CT-KIDNEY file name such as ``Cyst- (1219).jpg``."""
    m = _INDEX_RE.search(name)
    return int(m.group(1)) if m else None


def load_image(path: str | Path) -> np.ndarray:
    """Load a PNG/JPEG (or DICOM) file as a float32 (H, W) image in [0, 1].

    Colour files are reduced to luminance, which for the CT-KIDNEY JPEGs (grayscale stored as
    three equal channels) is exactly the stored gray value. 16-bit files are scaled by 65535.
    DICOM files are converted to HU and shown in the abdomen window
    (see :func:`kidneyscan.data.dicom.load_dicom_image`).

    Raises
    ------
    DataError
        If the file is missing or cannot be decoded; the message names the file and the reason.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    if p.suffix.lower() == ".dcm" or _is_dicom(p):
        return load_dicom_image(p)
    try:
        with Image.open(p) as im:
            im.load()
            return image_to_float(im)
    except DataError as exc:
        raise DataError(f"{p}: {exc}") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL raises OSError for truncated/unknown files, SyntaxError for some broken headers.
        raise DataError(f"{p}: unreadable image ({exc})") from exc


def image_to_float(im: Image.Image) -> np.ndarray:
    """Convert a PIL image to float32 (H, W) in [0, 1] (luminance for colour images).

    Raises
    ------
    DataError
        For a floating-point image with values outside [0, 1] (no safe way to scale it).
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return (np.asarray(im, dtype=np.float32) / 65535.0).astype(np.float32)
    if im.mode == "I":
        arr = np.asarray(im, dtype=np.float32)
        # 32-bit integer mode is how PIL opens many 16-bit PNGs; scale by the bit depth in use.
        scale = 255.0 if arr.max(initial=0) <= 255 else 65535.0
        return np.clip(arr / scale, 0.0, 1.0).astype(np.float32)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
            raise DataError(
                f"floating-point image with values in [{arr.min():g}, {arr.max():g}],"
                " expected [0, 1]"
            )
        return arr.astype(np.float32)
    return np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255.0)


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
        return lowered.index(str(name).strip().lower())
    except ValueError:
        raise DataError(f"unknown class {name!r}; expected one of {', '.join(classes)}") from None


def scan_dataset(
    root: str | Path,
    classes: tuple[str, ...] = CLASSES,
    *,
    use_csv: bool = True,
    verify: bool = False,
) -> list[Sample]:
    """List the images of a CT-KIDNEY / ImageFolder tree.

    Parameters
    ----------
    root
        Folder with one sub-folder per class, optionally with ``kidneyData.csv``.
    classes
        Class names in label order.
    use_csv
        Read ``kidneyData.csv`` when present (otherwise walk the class folders).
    verify
        Decode every image once, so an unreadable file fails here rather than mid-training.

    Returns
    -------
    list of Sample
        Sorted by label, then slice index, then path (a stable order for splits).

    Raises
    ------
    DataError
        Missing folder, unknown class folder (without csv), empty class folder, csv problems
        (missing column, unknown class, target code not matching the class name, duplicate
        row, row pointing to a missing file), or, with ``verify``, an unreadable image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    csv_path = root / CSV_NAME
    if use_csv and csv_path.is_file():
        samples = _scan_csv(root, csv_path, classes)
    else:
        samples = _scan_folders(root, classes)
    samples = _join_metadata(root, samples)
    samples.sort(key=lambda s: (s.label, s.index if s.index is not None else -1, str(s.path)))
    if verify:
        for s in samples:
            load_image(s.path)
    log.info("%s: %d images %s", root, len(samples), samples_summary(samples, classes)["per_class"])
    return samples


def _class_dirs(root: Path, classes: tuple[str, ...]) -> tuple[dict[int, list[Path]], list[Path]]:
    """Class folders by label (two folders may only differ in case), and the other folders."""
    by_label: dict[int, list[Path]] = {}
    others: list[Path] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            by_label.setdefault(class_index(sub.name, classes), []).append(sub)
        except DataError:
            others.append(sub)
    return by_label, others


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """Image files below ``folder`` and the number of other (skipped) files."""
    files = [
        f
        for f in folder.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    ]
    images = sorted(f for f in files if f.suffix.lower() in IMAGE_SUFFIXES)
    return images, len(files) - len(images)


def _scan_folders(root: Path, classes: tuple[str, ...]) -> list[Sample]:
    by_label, others = _class_dirs(root, classes)
    if others:
        names = ", ".join(repr(p.name) for p in others)
        raise DataError(
            f"{root}: unknown class folder(s) {names}; expected one of {', '.join(classes)}"
            f" (case-insensitive), or a {CSV_NAME} listing the images"
        )
    samples: list[Sample] = []
    skipped = 0
    for label, dirs in sorted(by_label.items()):
        for sub in dirs:
            files, n_other = _image_files(sub)
            skipped += n_other
            if not files:
                raise DataError(f"{sub}: class folder {sub.name!r} holds no images")
            for f in files:
                samples.append(
                    Sample(f, label, classes[label], f.stem, parse_index(f.name), site=None)
                )
    if skipped:
        log.warning("%s: skipped %d non-image file(s) in class folders", root, skipped)
    if not samples:
        raise DataError(f"{root}: no class folders with images")
    return samples


def _resolve_csv_path(root: Path, raw: str, class_name: str) -> Path | None:
    """Find the file a csv ``path`` cell means.

    The public csv has paths relative to the dataset folder, but copies circulate with the
    absolute paths of the machine that wrote them (``/kaggle/input/.../Cyst/Cyst- (1).jpg``), or
    with Windows separators; fall back to ``<root>/<class folder>/<file name>``.
    """
    cell = raw.strip().replace("\\", "/")
    if not cell:
        return None
    rel = PurePosixPath(cell)
    candidates = [root / rel] if not rel.is_absolute() else [Path(cell)]
    if len(rel.parts) >= 2:
        candidates.append(root / rel.parts[-2] / rel.name)
    candidates.append(root / class_name / rel.name)
    for c in candidates:
        if c.is_file():
            return c
    # Class folders may differ in case from the csv (``CYST/``): look the folder up.
    for sub in root.iterdir():
        if sub.is_dir() and sub.name.lower() == class_name.lower() and (sub / rel.name).is_file():
            return sub / rel.name
    return None


def _scan_csv(root: Path, csv_path: Path, classes: tuple[str, ...]) -> list[Sample]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: unreadable csv ({exc})") from exc
    if "path" not in columns or not ({"Class", "diag", "target"} & set(columns)):
        raise DataError(
            f"{csv_path}: expected columns ',image_id,path,diag,target,Class' (at least 'path'"
            f" and one of 'Class', 'diag', 'target'), found {columns}"
        )
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    samples: list[Sample] = []
    seen: dict[Path, int] = {}
    for i, raw_row in enumerate(rows):
        line = i + 2  # 1-based, after the header
        row = {(k or "").strip(): (v or "").strip() for k, v in raw_row.items() if k is not None}
        where = f"{csv_path.name} line {line}"
        label = _row_label(row, classes, where)
        class_name = classes[label]
        path = _resolve_csv_path(root, row["path"], class_name)
        if path is None:
            raise DataError(f"{where}: file {row['path']!r} not found under {root}")
        key = path.resolve()
        if key in seen:
            raise DataError(f"{where}: file {row['path']!r} already listed on line {seen[key]}")
        seen[key] = line
        image_id = row.get("image_id") or path.stem
        samples.append(
            Sample(
                path,
                label,
                class_name,
                image_id,
                parse_index(image_id)
                if parse_index(image_id) is not None
                else parse_index(path.name),
                site=row.get("site") or None,
            )
        )
    _log_unlisted(root, classes, seen)
    return samples


def _row_label(row: dict[str, str], classes: tuple[str, ...], where: str) -> int:
    """The label of a csv row; ``Class``, ``diag`` and ``target`` must agree when present."""
    names = [row[c] for c in ("Class", "diag") if row.get(c)]
    labels = set()
    for name in names:
        try:
            labels.add(class_index(name, classes))
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    if len(labels) > 1:
        raise DataError(f"{where}: 'Class' and 'diag' disagree ({' vs '.join(names)})")
    target = row.get("target", "")
    if target:
        try:
            code = int(float(target))
        except ValueError:
            raise DataError(f"{where}: target {target!r} is not an integer class code") from None
        if not 0 <= code < len(classes):
            raise DataError(f"{where}: target {code} outside 0..{len(classes) - 1}")
        if labels and code not in labels:
            expected = labels.pop()
            raise DataError(
                f"{where}: target {code} does not match class {names[0]!r}"
                f" (expected {expected}: {', '.join(f'{c} {k}' for k, c in enumerate(classes))})"
            )
        return code
    if not labels:
        raise DataError(f"{where}: no class name or target code")
    return labels.pop()


def _log_unlisted(root: Path, classes: tuple[str, ...], listed: dict[Path, int]) -> None:
    """Count (and log) images in class folders that the csv does not list."""
    by_label, others = _class_dirs(root, classes)
    unlisted: list[Path] = []
    for dirs in by_label.values():
        for sub in dirs:
            files, _ = _image_files(sub)
            unlisted.extend(f for f in files if f.resolve() not in listed)
    if unlisted:
        shown = ", ".join(str(p.relative_to(root)) for p in unlisted[:5])
        more = f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
        log.warning(
            "%s: %d image(s) in class folders are not listed in %s and were left out: %s%s",
            root,
            len(unlisted),
            CSV_NAME,
            shown,
            more,
        )
    if others:
        log.info(
            "%s: ignored %d folder(s) that are not classes: %s",
            root,
            len(others),
            ", ".join(p.name for p in others),
        )


def _join_metadata(root: Path, samples: list[Sample]) -> list[Sample]:
    """Fill ``site`` / ``patient_id`` from a side-car metadata csv (the phantom writes one)."""
    for name in METADATA_NAMES:
        meta_path = root / name
        if not meta_path.is_file():
            continue
        try:
            with meta_path.open(newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{meta_path}: unreadable csv ({exc})") from exc
        by_path = {_norm_rel(r.get("path", "")): r for r in rows if r.get("path")}
        by_id = {r["image_id"]: r for r in rows if r.get("image_id")}
        out: list[Sample] = []
        missing = 0
        for s in samples:
            r = by_path.get(_norm_rel(_rel(root, s.path))) or by_id.get(s.image_id)
            if r is None:
                missing += 1
                out.append(s)
                continue
            out.append(
                Sample(
                    s.path,
                    s.label,
                    s.class_name,
                    s.image_id,
                    s.index,
                    site=s.site or (r.get("site") or None),
                    patient_id=s.patient_id or (r.get("patient_id") or None),
                )
            )
        if missing:
            log.warning("%s: %d image(s) have no metadata row", meta_path, missing)
        return out
    return samples


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _norm_rel(p: str) -> str:
    return p.strip().replace("\\", "/").lower()


def samples_summary(
    samples: Iterable[Sample], classes: tuple[str, ...] = CLASSES
) -> dict[str, Any]:
    """Counts per class (and per site when sites are known), for logs and reports."""
    samples = list(samples)
    counts = {c: 0 for c in classes}
    for s in samples:
        counts[s.class_name] += 1
    summary: dict[str, Any] = {"n": len(samples), "per_class": counts}
    sites = Counter(s.site for s in samples if s.site is not None)
    if sites:
        summary["per_site"] = dict(sorted(sites.items()))
    return summary
