"""Safe DICOM reading for CT: Hounsfield units, named windows, series, de-identification.

Every reader returns the same kind of image as the JPEG path of
:func:`kidneyscan.data.datasets.load_image`: float32 ``(H, W)`` in ``[0, 1]``, here obtained by
converting stored values to Hounsfield units (``RescaleSlope`` / ``RescaleIntercept``, through
pydicom's modality LUT) and applying a display window.

Reading is defensive because DICOM comes from users of the web service: the header is read first
without pixels (``stop_before_pixels``) and checked (modality, photometric interpretation, image
size, sequence nesting depth) before any pixel data is decoded; every failure is a
:class:`~kidneyscan.data.errors.DataError` naming the source and the reason. Patient data never
enters a message or the metadata returned by :func:`load_dicom_bytes`.

Windows (:class:`~kidneyscan.data.windows.Window`, :data:`~kidneyscan.data.windows.WINDOWS`)
and de-identification (:func:`~kidneyscan.data.deid.deidentify`) live in their own modules and
are re-exported here; valid test slices are built by :mod:`kidneyscan.testing.dicom`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path
from struct import error as struct_error
from typing import Any

import numpy as np
import pydicom
from pydicom import config as _pydicom_config
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from kidneyscan.data.deid import (
    PHI_KEYWORDS,
    UID_KEYWORDS,
    deidentify,
    sequence_elements,
)
from kidneyscan.data.errors import DataError
from kidneyscan.data.windows import WINDOWS, Window

log = logging.getLogger(__name__)

# pydicom's reading validation reports invalid values *with the value* (a malformed birth date
# or an over-long patient ID) to warnings and to the "pydicom" logger, which would put patient
# data into service logs. Values are never trusted here anyway, so reading validation is off
# for the process (writing validation, used only when building test files, is untouched).
_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE

#: Pseudo-window name: use the window stored in the file (WindowWidth / WindowCenter).
FILE_WINDOW = "file"

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
MAX_SEQUENCE_DEPTH = 8
MAX_PIXELS = 4096 * 4096
MAX_BYTES = 64 * 1024 * 1024


def resolve_window(
    window: str | tuple[float, float] | Window, ds: Any | None = None, *, source: str = "DICOM"
) -> Window:
    """Turn a window name, ``(width, level)`` pair or :class:`Window` into a :class:`Window`.

    Parameters
    ----------
    window
        A key of :data:`WINDOWS`, ``"file"`` (the WindowWidth / WindowCenter stored in ``ds``),
        a ``(width, level)`` tuple in HU, or a :class:`Window`.
    ds
        The dataset, needed only for ``"file"``.
    source
        Name used in error messages.

    Raises
    ------
    DataError
        For an unknown name, a non-positive width, or ``"file"`` when the file stores no window.
    """
    if isinstance(window, Window):
        win = window
    elif isinstance(window, str):
        key = window.strip().lower()
        if key == FILE_WINDOW:
            win = _file_window(ds, source)
        elif key in WINDOWS:
            win = WINDOWS[key]
        else:
            names = ", ".join([*WINDOWS, FILE_WINDOW])
            raise DataError(f"{source}: unknown window {window!r}; expected one of {names}")
    else:
        try:
            width, level = (float(v) for v in window)
        except (TypeError, ValueError):
            raise DataError(
                f"{source}: window must be a name or (width, level), got {window!r}"
            ) from None
        win = Window(width, level)
    if not np.isfinite(win.width) or not np.isfinite(win.level) or win.width <= 0:
        raise DataError(f"{source}: window width must be a positive number, got {win.width}")
    return win


def _file_window(ds: Any | None, source: str) -> Window:
    if ds is None or "WindowWidth" not in ds or "WindowCenter" not in ds:
        raise DataError(f"{source}: window 'file' requested but the file stores no window")

    def first(v: Any) -> float:
        # Multi-valued (VM > 1) windows list alternatives; the first is the scanner's default.
        if isinstance(v, Iterable) and not isinstance(v, str):
            return float(next(iter(v)))
        return float(v)

    return Window(first(ds.WindowWidth), first(ds.WindowCenter), FILE_WINDOW)


def apply_window(
    hu: np.ndarray, window: str | tuple[float, float] | Window = "abdomen"
) -> np.ndarray:
    """Map HU values to display intensities in ``[0, 1]`` with a linear window.

    Parameters
    ----------
    hu
        Array of Hounsfield units (any shape, any real dtype).
    window
        A name from :data:`WINDOWS`, a ``(width, level)`` tuple in HU or a :class:`Window`
        (``"file"`` needs a dataset: use :func:`load_dicom_image` for that).

    Returns
    -------
    np.ndarray
        float32 array of ``hu``'s shape: 0 at ``level - width / 2`` and below, 1 at
        ``level + width / 2`` and above.
    """
    return resolve_window(window, None, source="apply_window").apply(hu)


def _check_depth(ds: Any, source: str, limit: int, depth: int = 0) -> None:
    """Raise when sequences nest deeper than ``limit``.

    pydicom parses sequence items lazily, so walking level by level and stopping at the limit
    never parses (or recurses into) the excess levels of a hostile file.
    """
    for elem in sequence_elements(ds):
        if depth + 1 > limit:
            raise DataError(f"{source}: sequences nested deeper than {limit} levels")
        for item in elem.value:
            _check_depth(item, source, limit, depth + 1)


def _safe_reason(exc: BaseException) -> str:
    """Exception text that cannot carry attribute values.

    pydicom's own parsing messages (missing preamble, bad lengths, decoder failures) describe
    structure; conversion errors (``ValueError: could not convert string to float: '...'``)
    quote the value, so for those only the type is kept.
    """
    if isinstance(exc, InvalidDicomError | EOFError | struct_error):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def _dcmread(fh: io.BufferedIOBase | io.BytesIO, *, stop_before_pixels: bool, source: str) -> Any:
    try:
        return pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise DataError(f"{source}: not a DICOM file ({exc})") from exc
    except (EOFError, OSError) as exc:
        raise DataError(f"{source}: truncated or unreadable DICOM ({_safe_reason(exc)})") from exc
    except RecursionError as exc:
        raise DataError(f"{source}: sequences nested too deeply to parse") from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed input
        raise DataError(f"{source}: malformed DICOM ({_safe_reason(exc)})") from exc


def _check_header(ds: Any, source: str, *, require_ct: bool, max_pixels: int, depth: int) -> None:
    try:
        _check_depth(ds, source, depth)
    except RecursionError as exc:
        raise DataError(f"{source}: sequences nested too deeply to parse") from exc
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed sequence items
        raise DataError(f"{source}: malformed sequence ({_safe_reason(exc)})") from exc
    try:
        _check_image_header(ds, source, require_ct=require_ct, max_pixels=max_pixels)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - unconvertible image attributes
        raise DataError(f"{source}: malformed image attributes ({_safe_reason(exc)})") from exc


def _check_image_header(ds: Any, source: str, *, require_ct: bool, max_pixels: int) -> None:
    modality = str(ds.get("Modality", "")).upper()
    if require_ct and modality != "CT":
        shown = modality or "missing"
        raise DataError(
            f"{source}: modality {shown!r} is not CT; Hounsfield-unit windows apply only to CT"
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise DataError(f"{source}: no image (Rows/Columns missing); no pixel data to read")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise DataError(
            f"{source}: unsupported photometric interpretation {photometric or 'missing'!r};"
            f" expected {' or '.join(SUPPORTED_PHOTOMETRIC)}"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DataError(f"{source}: {ds.SamplesPerPixel} samples per pixel; expected 1 (grayscale)")
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0:
        raise DataError(f"{source}: invalid image size {rows}x{cols}")
    if rows * cols * frames > max_pixels:
        raise DataError(
            f"{source}: image of {rows}x{cols}x{frames} pixels exceeds the limit of {max_pixels}"
        )
    if frames != 1:
        raise DataError(f"{source}: multi-frame image ({frames} frames); expected one slice")


def read_dicom(
    src: str | Path | bytes,
    *,
    require_ct: bool = True,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    max_sequence_depth: int = MAX_SEQUENCE_DEPTH,
    source: str | None = None,
) -> Any:
    """Read and validate a single-slice DICOM file or byte string.

    The header is read first without pixel data and checked; only then is the full file read
    and its pixel data decoded once (so a truncated file fails here, not later).

    Parameters
    ----------
    src
        Path of a file, or its bytes (as uploaded to the web service).
    require_ct
        Reject modalities other than CT (Hounsfield units are meaningless elsewhere).
    max_pixels, max_bytes
        Size limits checked before decoding (pixels from the header, bytes from the input).
    max_sequence_depth
        Deepest allowed nesting of sequences.
    source
        Name for error messages; defaults to the path, or ``"DICOM upload"`` for bytes.

    Returns
    -------
    pydicom.dataset.FileDataset
        The dataset, with ``pixel_array`` already decoded.

    Raises
    ------
    DataError
        Not DICOM, truncated, no pixel data, not CT, unsupported photometric interpretation,
        too large, nested too deep, or pixel data that cannot be decoded.
    """
    is_bytes = isinstance(src, bytes | bytearray)
    name = source or ("DICOM upload" if is_bytes else str(src))
    if isinstance(src, bytes | bytearray):
        size = len(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise DataError(f"{name}: file not found")
        size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"{name}: {size} bytes exceeds the limit of {max_bytes}")
    with io.BytesIO(bytes(src)) if is_bytes else path.open("rb") as fh:  # type: ignore[arg-type]
        header = _dcmread(fh, stop_before_pixels=True, source=name)
        # pydicom stops quietly at end of data, so a header read that consumed the whole input
        # never met the pixel data: the file was cut short, or holds no image at all.
        if fh.tell() >= size:
            raise DataError(
                f"{name}: no pixel data (the data ends before any pixel data: truncated file"
                " or not an image)"
            )
        _check_header(
            header, name, require_ct=require_ct, max_pixels=max_pixels, depth=max_sequence_depth
        )
        fh.seek(0)
        ds = _dcmread(fh, stop_before_pixels=False, source=name)
    if "PixelData" not in ds:
        raise DataError(f"{name}: no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types for bad data
        # Decoder messages describe lengths and syntaxes, never attribute values.
        raise DataError(
            f"{name}: pixel data truncated or undecodable ({type(exc).__name__}: {exc})"
        ) from exc
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        raise DataError(f"{name}: decoded pixels have shape {arr.shape}, header says otherwise")
    return ds


def to_hu(ds: Any) -> np.ndarray:
    """Convert a CT dataset's stored pixel values to Hounsfield units.

    Uses pydicom's modality LUT, i.e. ``stored * RescaleSlope + RescaleIntercept`` (slope 1 and
    intercept 0 when absent). Photometric interpretation does not matter here: HU are physical.

    Returns
    -------
    np.ndarray
        float32 ``(H, W)`` array of HU.
    """
    arr = ds.pixel_array
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)


def load_dicom_image(
    path: str | Path, window: str | tuple[float, float] | Window = "abdomen"
) -> np.ndarray:
    """Load a CT DICOM slice as float32 ``(H, W)`` in ``[0, 1]`` (HU, then ``window``)."""
    ds = read_dicom(path)
    win = resolve_window(window, ds, source=str(path))
    return apply_window(to_hu(ds), win)


def safe_metadata(ds: Any, window: Window) -> dict[str, Any]:
    """Non-identifying facts about a slice: modality, size, spacing, thickness, window.

    Built from an allow-list, so no patient, institution or date attribute can slip through.
    """

    def number(keyword: str) -> Any:
        try:
            value = ds.get(keyword)
            if value is None or value == "":
                return None
            if keyword == "PixelSpacing":
                return [float(x) for x in value]
            return float(value)
        except (TypeError, ValueError):  # a malformed value is left out, never quoted
            return None

    return {
        "modality": str(ds.get("Modality", "")),
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "pixel_spacing_mm": number("PixelSpacing"),
        "slice_thickness_mm": number("SliceThickness"),
        "window": window.as_dict(),
    }


def load_dicom_bytes(
    data: bytes,
    window: str | tuple[float, float] | Window = "abdomen",
    *,
    max_bytes: int = MAX_BYTES,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode an uploaded CT DICOM into an image and safe metadata (for the web service).

    Parameters
    ----------
    data
        The uploaded bytes (never written to disk).
    window
        Display window, as for :func:`apply_window`, or ``"file"``.
    max_bytes
        Upload size limit checked before parsing.

    Returns
    -------
    image : np.ndarray
        float32 ``(H, W)`` in ``[0, 1]``.
    safe_meta : dict
        Only ``modality``, ``rows``, ``cols``, ``pixel_spacing_mm``, ``slice_thickness_mm`` and
        ``window``: never patient name, ID, birth date, accession number or institution.

    Raises
    ------
    DataError
        Anything :func:`read_dicom` rejects; messages never contain patient data.
    """
    if not isinstance(data, bytes | bytearray):
        raise DataError(f"DICOM upload: expected bytes, got {type(data).__name__}")
    ds = read_dicom(bytes(data), max_bytes=max_bytes)
    win = resolve_window(window, ds, source="DICOM upload")
    return apply_window(to_hu(ds), win), safe_metadata(ds, win)


def _slice_position(ds: Any) -> float | None:
    """Position along the slice normal (from ImageOrientationPatient), else None."""
    try:
        pos = np.asarray([float(v) for v in ds.ImagePositionPatient])
        ori = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    if pos.shape != (3,) or ori.shape != (6,):
        return None
    normal = np.cross(ori[:3], ori[3:])
    return float(pos @ normal)


def _is_dicom_file(p: Path) -> bool:
    try:
        with p.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def load_dicom_series(
    folder: str | Path, window: str | tuple[float, float] | Window = "abdomen"
) -> tuple[np.ndarray, list[Path]]:
    """Load a folder of CT slices as a volume sorted along the patient axis.

    Slices are ordered by their position along the slice normal (ImagePositionPatient projected
    on the normal of ImageOrientationPatient); when any slice lacks a position, by
    InstanceNumber. Files that are not DICOM are skipped and counted in the log.

    Returns
    -------
    volume : np.ndarray
        float32 ``(N, H, W)`` in ``[0, 1]``.
    paths : list of Path
        The file of each slice, in volume order.

    Raises
    ------
    DataError
        Missing folder, no DICOM files, slices of several series, differing slice sizes, or a
        slice :func:`read_dicom` rejects.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    dicoms = [p for p in files if _is_dicom_file(p)]
    skipped = len(files) - len(dicoms)
    if skipped:
        log.info("%s: skipped %d non-DICOM file(s)", root, skipped)
    if not dicoms:
        raise DataError(f"{root}: no DICOM files (looked for 'DICM' at byte 128)")
    slices = [(p, read_dicom(p)) for p in dicoms]
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise DataError(f"{root}: slices belong to {len(series)} different series")
    shapes = {ds.pixel_array.shape for _, ds in slices}
    if len(shapes) > 1:
        raise DataError(f"{root}: slices have different sizes {sorted(shapes)}")
    positions = [_slice_position(ds) for _, ds in slices]
    if all(p is not None for p in positions):
        order = sorted(range(len(slices)), key=lambda i: (positions[i], str(slices[i][0])))
    else:
        instances = []
        for p, ds in slices:
            if "InstanceNumber" not in ds:
                raise DataError(f"{p}: neither ImagePositionPatient nor InstanceNumber to sort by")
            instances.append(int(ds.InstanceNumber))
        order = sorted(range(len(slices)), key=lambda i: (instances[i], str(slices[i][0])))
    images = []
    for i in order:
        p, ds = slices[i]
        images.append(apply_window(to_hu(ds), resolve_window(window, ds, source=str(p))))
    return np.stack(images).astype(np.float32, copy=False), [slices[i][0] for i in order]


__all__ = [
    "FILE_WINDOW",
    "MAX_BYTES",
    "MAX_PIXELS",
    "MAX_SEQUENCE_DEPTH",
    "PHI_KEYWORDS",
    "SUPPORTED_PHOTOMETRIC",
    "UID_KEYWORDS",
    "WINDOWS",
    "Window",
    "apply_window",
    "deidentify",
    "load_dicom_bytes",
    "load_dicom_image",
    "load_dicom_series",
    "read_dicom",
    "resolve_window",
    "safe_metadata",
    "to_hu",
]
