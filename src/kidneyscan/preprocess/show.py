"""Before/after panel for one image through a pipeline (``kidneyscan preprocess show``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def show_panel(image_path: Path, steps: list[dict[str, Any]], out: Path) -> Path:
    """Load ``image_path``, apply ``steps`` one by one and save a PNG panel to ``out``.

    Each step's output is shown with its name; the last panel draws the kidney segmentation
    (watershed) and the ``crop_kidneys`` box on the final image.

    Raises
    ------
    ValueError
        Unknown step, bad parameters, or an unreadable image (from ``load_image``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kidneyscan.data.datasets import load_image
    from kidneyscan.preprocess.pipeline import STEPS, Preprocessor
    from kidneyscan.preprocess.roi import kidney_band_box
    from kidneyscan.preprocess.segment import segment_kidneys

    pre = Preprocessor(steps=steps)  # validates names before any work
    img = load_image(Path(image_path))
    stages = [("input", img)]
    cur = img
    for step in pre.steps:
        params = {k: v for k, v in step.items() if k != "name"}
        try:
            cur = np.clip(STEPS[step["name"]](cur, **params), 0, 1).astype(np.float32)
        except TypeError as exc:
            raise ValueError(f"step {step['name']!r}: bad parameters {params}: {exc}") from exc
        label = step["name"] + (f" {params}" if params else "")
        stages.append((label, cur))
    n = len(stages) + 1
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4.4))
    for ax, (title, im) in zip(axes, stages, strict=False):
        ax.imshow(im, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    ax = axes[-1]
    kid = segment_kidneys(cur, method="watershed")
    band = kidney_band_box(cur)
    t, lft, b, r = band.as_tuple()
    ax.imshow(cur, cmap="gray", vmin=0, vmax=1)
    if kid.any():
        ax.contour(kid, levels=[0.5], colors="red", linewidths=0.8)
    ax.add_patch(plt.Rectangle((lft, t), r - lft, b - t, fill=False, color="yellow"))
    ax.set_title(f"kidneys (red), kidney band from {band.source} (yellow)", fontsize=9)
    ax.axis("off")
    fig.suptitle(Path(image_path).name, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
