"""Tiny synthetic data for the engine tests: an easy 4-class problem of 64 px images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("Cyst", "Normal", "Stone", "Tumor")


def write_easy_dataset(root: Path, per_class: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Write an ImageFolder tree where each class has its own kind of blob at a random place.

    Cyst: a large mid-grey disc; Normal: nothing; Stone: a few tiny white dots; Tumor: a dark
    disc. Easy on purpose: a tiny model must beat chance on it within a few epochs.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(0.4, 0.04, (size, size))
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2
            if name == "Cyst":
                img[disc] = 0.75
            elif name == "Tumor":
                img[disc] = 0.05
            elif name == "Stone":
                for _ in range(4):
                    y, x = rng.integers(2, size - 3, 2)
                    img[y - 1 : y + 2, x - 1 : x + 2] = 1.0
            arr = (np.clip(img, 0, 1) * 255).astype(np.uint8)
            # Index gaps of 20 make every image its own block for the leakage-aware split.
            Image.fromarray(arr).save(root / name / f"{name}- ({(i + 1) * 20}).png")
    return root
