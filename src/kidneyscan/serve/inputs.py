"""Turn uploaded bytes into images: magic-byte sniffing, size limits, safe decoding.

Everything here works on bytes in memory: uploads are never written to disk. The file type is
decided by the first bytes only (PNG signature, JPEG SOI marker, ``DICM`` at offset 128), never
by the client's file name or content type. Every failure is an :class:`InputError` carrying
the HTTP status and a reason that names what was wrong (and never DICOM patient data).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from kidneyscan.data import dicom
from kidneyscan.data.datasets import image_to_float
from kidneyscan.data.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128

#: Default pixel limit (width x height), checked from the header before any full decode.
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Smallest side accepted: below this a CT slice carries no usable anatomy.
MIN_SIDE = 16


class InputError(Exception):
    """A client sent something unusable; maps to a 4xx JSON response.

    Parameters
    ----------
    status
        HTTP status code (400, 413, 415, 422...).
    message
        Human-readable reason naming what was wrong.
    code
        Short machine-readable error type, e.g. ``"unsupported_media_type"``.
    """

    def __init__(self, status: int, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass
class DecodedImage:
    """An uploaded image after decoding.

    Attributes
    ----------
    image
        float32 (H, W) in [0, 1], exactly what ``kidneyscan.data.datasets.load_image`` gives
        for the same file on disk.
    kind
        ``"png"``, ``"jpeg"`` or ``"dicom"``.
    width, height
        Size of the uploaded image in pixels.
    dicom
        Non-identifying DICOM facts (modality, size, spacing, window) or ``None``.
    warnings
        Notes for the user about the input (e.g. a colour image).
    """

    image: np.ndarray
    kind: str
    width: int
    height: int
    dicom: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the input (no pixels, no patient data)."""
        out: dict[str, Any] = {"type": self.kind, "width": self.width, "height": self.height}
        if self.dicom is not None:
            out["dicom"] = self.dicom
        return out


def sniff_type(data: bytes) -> str | None:
    """Return ``"png"``, ``"jpeg"``, ``"dicom"`` or ``None`` from the leading bytes only."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
        return "dicom"
    return None


def decode_upload(
    data: bytes,
    *,
    label: str = "upload",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
) -> DecodedImage:
    """Decode one uploaded file.

    Parameters
    ----------
    data
        The raw bytes.
    label
        How the file is named in error messages (e.g. ``"file 2"``); never the client's
        file name, which may carry patient data.
    max_pixels
        Largest width x height accepted; checked from the header before decoding pixels.
    max_bytes
        Largest file accepted (``None``: no extra limit beyond the request limit).

    Returns
    -------
    DecodedImage

    Raises
    ------
    InputError
        400 empty/truncated/corrupt, 413 too large, 415 not PNG/JPEG/DICOM, 422 decodable but
        unusable (no pixel data, not CT, multi-frame, too small).
    """
    if not data:
        raise InputError(400, f"{label} is empty (0 bytes)", "empty_file")
    if max_bytes is not None and len(data) > max_bytes:
        raise InputError(
            413, f"{label} is {len(data)} bytes; the limit is {max_bytes}", "payload_too_large"
        )
    kind = sniff_type(data)
    if kind is None:
        raise InputError(
            415,
            f"{label} is not a PNG, JPEG or DICOM file (decided by its content, not its name)",
            "unsupported_media_type",
        )
    if kind == "dicom":
        return _decode_dicom(data, label, max_pixels)
    return _decode_raster(data, kind, label, max_pixels)


def _check_size(width: int, height: int, label: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InputError(
            413,
            f"{label} is {width} x {height} pixels; the limit is {max_pixels} pixels "
            "(checked before decoding)",
            "image_too_large",
        )
    if min(width, height) < MIN_SIDE:
        raise InputError(
            422,
            f"{label} is {width} x {height} pixels; at least {MIN_SIDE} x {MIN_SIDE} is needed",
            "image_too_small",
        )


def _decode_raster(data: bytes, kind: str, label: str, max_pixels: int) -> DecodedImage:
    fmt = "PNG" if kind == "png" else "JPEG"
    try:
        # ``formats`` keeps PIL to the sniffed decoder; ``open`` reads only the header.
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            width, height = im.size
            _check_size(width, height, label, max_pixels)
            mode = im.mode
            im.load()
            image = image_to_float(im)
            colour = mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") and _is_colour(im)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        # PIL refuses absurd header sizes itself, while opening; same answer as ours.
        raise InputError(
            413,
            f"{label}: the image header claims far more than the limit of {max_pixels} pixels "
            "(refused before decoding)",
            "image_too_large",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on malformed data
        raise InputError(
            400,
            f"{label}: truncated or corrupt {fmt} ({type(exc).__name__}: {exc})",
            "corrupt_image",
        ) from exc
    if not np.isfinite(image).all():
        raise InputError(400, f"{label}: {fmt} decoded to non-finite values", "corrupt_image")
    warnings = []
    if colour:
        warnings.append(
            "colour image converted to grayscale: the model expects a CT slice in a "
            "soft-tissue window"
        )
    return DecodedImage(image, kind, width, height, warnings=warnings)


def _is_colour(im: Any) -> bool:
    """True when the channels of an RGB-like image differ visibly (not gray stored as RGB)."""
    rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    spread = np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean()
    return bool(spread > 2.0)


def _decode_dicom(data: bytes, label: str, max_pixels: int) -> DecodedImage:
    try:
        # read_dicom checks the header (size, modality, nesting depth) before decoding pixels.
        ds = dicom.read_dicom(data, max_pixels=max_pixels, max_bytes=len(data), source=label)
        window = dicom.resolve_window("abdomen", ds, source=label)
        image = dicom.apply_window(dicom.to_hu(ds), window)
        meta = dicom.safe_metadata(ds, window)
    except DataError as exc:
        msg = str(exc)
        if "exceeds the limit" in msg:
            raise InputError(413, msg, "image_too_large") from exc
        # Readable but unusable files (no pixels, not CT, multi-frame...) are 422; files that
        # do not parse are 400.
        unusable = any(
            word in msg
            for word in ("no pixel", "no image", "not CT", "multi-frame", "photometric", "samples")
        )
        raise InputError(
            422 if unusable else 400, msg, "unusable_dicom" if unusable else "corrupt_dicom"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - anything else a hostile file can trigger
        raise InputError(
            400, f"{label}: malformed DICOM ({type(exc).__name__})", "corrupt_dicom"
        ) from exc
    _check_size(int(meta["cols"]), int(meta["rows"]), label, max_pixels)
    return DecodedImage(image, "dicom", int(meta["cols"]), int(meta["rows"]), dicom=meta)
