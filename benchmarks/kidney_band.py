"""Benchmark: how often the kidney band finds the spine, on the real sample and on phantoms.

Real slices have no kidney masks: the script counts how often a vertebra anchored the box
(``source == "spine"``) and draws a montage of boxes and crops to look at. Phantom slices have
masks: it reports the share of slices with >= 95 % of their kidney pixels inside the box.
Writes ``benchmarks/results/kidney_band.{json,md}`` and ``docs/img/kidney_band_montage.png``
(real slices are drawn only into that image, from ``../shared``; none is committed as a file).

Usage::

    python benchmarks/kidney_band.py --data ../shared/data/ct-kidney
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from kidneyscan.data.datasets import load_image, scan_dataset
from kidneyscan.data.phantom import generate_dataset
from kidneyscan.preprocess.roi import kidney_band_box

REPO = Path(__file__).resolve().parents[1]


def real_sample(data: Path, montage: Path, n_show: int = 24) -> dict[str, object]:
    """Spine-found rate on every real slice, and a montage of ``n_show`` of them."""
    samples = scan_dataset(data)
    t0 = time.perf_counter()
    boxes = [(s, kidney_band_box(load_image(s.path))) for s in samples]
    ms = 1000 * (time.perf_counter() - t0) / len(samples)
    sources = Counter(b.source for _, b in boxes)
    rng = np.random.default_rng(0)
    shown = [boxes[i] for i in sorted(rng.choice(len(boxes), n_show, replace=False))]
    misses = [sb for sb in boxes if sb[1].source != "spine"][:4]
    tiles = []
    for s, b in shown + misses:
        img = (load_image(s.path) * 255).astype(np.uint8)
        vis = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        colour = (0, 200, 0) if b.source == "spine" else (0, 0, 255)
        cv2.rectangle(vis, (b.left, b.top), (b.right - 1, b.bottom - 1), colour, 3)
        cv2.putText(vis, f"{s.class_name} {b.source}", (8, 28), 0, 0.8, (255, 255, 0), 2)
        crop = cv2.resize(vis[b.top : b.bottom, b.left : b.right], (336, 224))
        tiles.append(np.hstack([cv2.resize(vis, (224, 224)), crop]))
    while len(tiles) % 4:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i : i + 4]) for i in range(0, len(tiles), 4)])
    montage.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(montage), cv2.resize(grid, (grid.shape[1] // 2, grid.shape[0] // 2)))
    return {
        "images": len(samples),
        "sources": dict(sources),
        "spine_found": sources["spine"] / len(samples),
        "ms_per_image": ms,
        "misses": [str(s.path.name) for s, b in boxes if b.source != "spine"],
    }


def phantom(sizes: list[int], n: int, seed: int) -> list[dict[str, object]]:
    """Kidney-pixel coverage of the box on phantom slices with their masks."""
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            generate_dataset(tmp, n, seed=seed, sites=3, image_size=size)
            inside, sources = [], Counter()
            for s in scan_dataset(tmp):
                b = kidney_band_box(load_image(s.path))
                sources[b.source] += 1
                m = np.array(Image.open(Path(tmp) / "masks" / f"{s.image_id}_kidney.png")) > 0
                inside.append(m[b.top : b.bottom, b.left : b.right].sum() / max(1, m.sum()))
        cov = np.array(inside)
        rows.append(
            {
                "image_size": size,
                "slices": n,
                "spine_found": sources["spine"] / n,
                "slices_with_95pct_inside": float((cov >= 0.95).mean()),
                "median_kidney_fraction_inside": float(np.median(cov)),
            }
        )
    return rows


def main() -> int:
    """Run both parts and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/ct-kidney")
    ap.add_argument("--phantom-n", type=int, default=300)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    out: dict[str, object] = {"phantom": phantom(args.sizes, args.phantom_n, 11)}
    if (args.data / "kidneyData.csv").is_file():
        out["real"] = real_sample(args.data, REPO / "docs/img/kidney_band_montage.png")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "kidney_band.json").write_text(json.dumps(out, indent=2))
    lines = [
        "# Kidney band: spine found, kidneys inside",
        "",
        "`python benchmarks/kidney_band.py --data ../shared/data/ct-kidney`",
        "",
        "| data | slices | spine found | slices with >= 95 % of kidney pixels in the box |",
        "|---|---|---|---|",
    ]
    real = out.get("real")
    if isinstance(real, dict):
        lines.append(
            f"| real CT-KIDNEY sample (no masks) | {real['images']} | "
            f"{real['spine_found']:.1%} | (not measurable: no masks; montage in docs) |"
        )
    for r in out["phantom"]:  # type: ignore[attr-defined]
        lines.append(
            f"| phantom {r['image_size']} px, 3 sites | {r['slices']} | {r['spine_found']:.1%} | "
            f"{r['slices_with_95pct_inside']:.1%} |"
        )
    (args.results / "kidney_band.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
