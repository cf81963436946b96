"""Side-by-side figure: real CT-KIDNEY slices next to phantom slices, plus grey-level statistics.

The figure contains real images, so it is written to ``benchmarks/out/`` (git-ignored) and
never committed. ``--phantom-only`` instead writes a phantom-only montage (one row per class,
with the lesion outlined in red in a second copy) to ``benchmarks/results/phantom_montage.png``,
which may be committed. Usage::

    python benchmarks/phantom_compare.py [--real ../shared/data/ct-kidney] [--seed 0]
    python benchmarks/phantom_compare.py --phantom-only
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from kidneyscan.data.datasets import CLASSES, load_image, scan_dataset
from kidneyscan.data.phantom import make_sites, render_slice

REPO = Path(__file__).resolve().parents[1]


def _stats(images: list[np.ndarray]) -> dict[str, float]:
    """Grey-level statistics that tell a CT slice from a cartoon."""
    arr = np.stack(images)
    fg = arr > 0.02
    hist = np.histogram(arr[fg], bins=10, range=(0, 1))[0] / max(int(fg.sum()), 1)
    return {
        "mean": round(float(arr.mean()), 4),
        "foreground_fraction": round(float(fg.mean()), 4),
        "foreground_mean": round(float(arr[fg].mean()), 4),
        "saturated_fraction": round(float((arr > 0.98).mean()), 4),
        "hist_foreground_10bins": [round(float(h), 3) for h in hist],
    }


def phantom_montage(seed: int, path: Path, tile: int = 192, per_class: int = 4) -> None:
    """Rows = classes; each slice twice: as rendered, then with the lesion mask outlined."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    sites = make_sites(3, seed)
    rows = []
    for c in CLASSES:
        row = []
        for k in range(per_class):
            sl = render_slice(rng, c, sites[k % len(sites)], image_size=512)
            u8 = (np.clip(sl.image, 0, 1) * 255).astype(np.uint8)
            rgb = np.repeat(u8[..., None], 3, axis=2)
            edge = sl.masks["lesion"] & ~ndimage.binary_erosion(sl.masks["lesion"])
            edge = ndimage.binary_dilation(edge, iterations=2)
            outlined = rgb.copy()
            outlined[edge] = (255, 40, 40)
            for img in (rgb, outlined):
                row.append(np.asarray(Image.fromarray(img).resize((tile, tile), Image.BILINEAR)))
        rows.append(np.hstack(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.vstack(rows)).save(path, optimize=True)
    print(f"{path}: rows {', '.join(CLASSES)}; pairs of (slice, lesion outlined)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_real = os.environ.get("KIDNEYSCAN_REAL_DATA", REPO.parent / "shared/data/ct-kidney")
    ap.add_argument("--real", type=Path, default=Path(default_real))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--phantom-only", action="store_true", help="montage without real images")
    args = ap.parse_args()
    if args.phantom_only:
        phantom_montage(args.seed, REPO / "benchmarks/results/phantom_montage.png")
        return

    rng = np.random.default_rng(args.seed)
    samples = scan_dataset(args.real)
    sites = make_sites(3, args.seed)
    tile = 256
    rows, real_all, ph_all = [], [], []
    for rep in range(args.per_class):
        real_row, ph_row = [], []
        for c in CLASSES:
            pool = [s for s in samples if s.class_name == c]
            real = load_image(pool[int(rng.integers(len(pool)))].path)
            sl = render_slice(rng, c, sites[rep % len(sites)], image_size=512)
            real_all.append(real)
            ph_all.append(sl.image)
            for img, row in ((real, real_row), (sl.image, ph_row)):
                u8 = (np.clip(img, 0, 1) * 255).astype(np.uint8)
                row.append(np.asarray(Image.fromarray(u8).resize((tile, tile), Image.BILINEAR)))
        rows += [np.hstack(real_row), np.hstack(ph_row)]
    args.out.mkdir(parents=True, exist_ok=True)
    fig = args.out / "phantom_vs_real.png"
    Image.fromarray(np.vstack(rows)).save(fig)
    stats = {"real": _stats(real_all), "phantom": _stats(ph_all)}
    (args.out / "phantom_vs_real.json").write_text(json.dumps(stats, indent=2))
    print(f"{fig}: rows alternate real / phantom, columns {', '.join(CLASSES)}")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
