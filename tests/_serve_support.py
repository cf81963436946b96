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
) -> Path:
    """Save a randomly initialised classifier (4 classes, 64 px) as a KidneyScan checkpoint."""
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
        "preprocessing": Preprocessor(image_size=image_size).to_dict(),
        "temperature": temperature,
        "task": "kidney-ct-4class",
        "metrics": {"test": {"macro_f1": 0.25}},
        "training": {"dataset": "test fixture", "n": 0},
    }
    return save_checkpoint(out, model, meta)


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
