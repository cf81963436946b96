"""Helpers shared by the serve tests: a tiny checkpoint and image bytes made in memory."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]
TEMPERATURE = 1.5


#: A tiny hybrid (ConvNeXt-atto backbone + one Transformer layer) at 64 px, backbone frozen.
HYBRID = {
    "backbone": "convnext_atto",
    "image_size": 64,
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
    "freeze_fraction": 1.0,
}


def make_checkpoint(
    out: Path,
    *,
    image_size: int = 64,
    temperature: float = TEMPERATURE,
    name: str = "convnext_atto",
    kwargs: dict | None = None,
    steps: list[dict] | None = None,
    image_width: int | None = None,
) -> Path:
    """Save a randomly initialised classifier (4 classes, 64 px) as a KidneyScan checkpoint.

    ``steps`` / ``image_width`` set the preprocessing, e.g. ``KIDNEY_BAND`` at 64 x 96 like the
    default recipe's 3:2 kidney band.
    """
    import torch

    from kidneyscan.models.checkpoint import save_checkpoint
    from kidneyscan.models.factory import create_classifier
    from kidneyscan.preprocess.pipeline import Preprocessor

    torch.manual_seed(0)
    kwargs = dict(kwargs or {})
    model = create_classifier(name, len(CLASSES), **kwargs)
    meta = {
        "model": {"name": name, "kwargs": kwargs},
        "classes": CLASSES,
        "preprocessing": Preprocessor(
            steps=list(steps or []), image_size=image_size, image_width=image_width
        ).to_dict(),
        "temperature": temperature,
        "task": "kidney-ct-4class",
        "metrics": {"test": {"macro_f1": 0.25}},
        "training": {"dataset": "test fixture", "n": 0},
    }
    return save_checkpoint(out, model, meta)


#: The default recipe's first (here only) preprocessing step: crop to the kidney band.
KIDNEY_BAND = [{"name": "crop_kidney_band"}]


def phantom_hu(size: int = 128, seed: int = 0, class_name: str = "Stone") -> np.ndarray:
    """A synthetic axial kidney-level CT slice in Hounsfield units (float32, spine visible)."""
    from kidneyscan.data.phantom import make_sites, render_slice

    site = make_sites(1, seed=0)[0]
    return render_slice(np.random.default_rng(seed), class_name, site, image_size=size).hu


def no_spine(size: int = 96) -> np.ndarray:
    """A uint8 'body' (a soft-tissue grey ellipse on black) with no bone: no vertebra to find."""
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (size * 0.35)) ** 2 + ((xx - size / 2) / (size * 0.45)) ** 2 < 1
    return np.where(body, 110, 0).astype(np.uint8)


def ct_like(size: int = 96, seed: int = 0) -> np.ndarray:
    """A uint8 grayscale image with a bright blob on a noisy dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    blob = ((yy - size * 0.45) ** 2 + (xx - size * 0.6) ** 2) < (size * 0.18) ** 2
    img = 40 + 30 * rng.random((size, size)) + 150 * blob
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs: object) -> bytes:
    """PIL-encode an array (PNG or JPEG) to bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (pixel data of a 16 x 16 image)."""
    import struct
    import zlib

    data = bytearray(encode(ct_like(16)))
    # IHDR is the first chunk: length(4) 'IHDR'(4) width(4) height(4) ... CRC over type+data.
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def multipart(*blobs: bytes, field: str = "file", names: list[str] | None = None) -> dict:
    """A Flask test-client ``data=`` dict uploading ``blobs`` in one multipart field."""
    names = names or [f"image{i}.png" for i in range(len(blobs))]
    return {field: [(io.BytesIO(b), n) for b, n in zip(blobs, names, strict=True)]}
