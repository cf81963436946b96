"""Shortcut probe: how well do trivial image features predict the class, real vs phantom?

A classifier that sees only global grey-level statistics (mean, spread, scan area...) should be
near chance (25 %) on a data set without shortcuts; on the public CT-KIDNEY images the contrast
phase differs between classes, so it is not. A linear model on 16 x 16 thumbnails gives a second,
still trivial, reference. Cross-validation is grouped (phantom: true patient; real data:
contiguous index blocks from ``kidneyscan.data.splits``) so neighbouring slices never straddle
folds. Writes ``benchmarks/results/phantom_shortcuts.{json,md}`` (numbers only, no images)::

    python benchmarks/phantom_shortcuts.py [--real ../shared/data/ct-kidney] [--n 800]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kidneyscan.data.datasets import load_image, scan_dataset
from kidneyscan.data.phantom import generate_dataset
from kidneyscan.data.splits import index_blocks

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results"


def features(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(global statistics, 16 x 16 thumbnail) of a [0, 1] image."""
    fg = img > 0.05
    vals = img[fg] if fg.any() else img.ravel()
    stats = np.array(
        [
            img.mean(),
            img.std(),
            fg.mean(),
            vals.mean(),
            vals.std(),
            *np.percentile(vals, [10, 50, 90, 99]),
            (img > 0.98).mean(),
        ]
    )
    thumb = cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA).ravel()
    return stats, thumb


def probe(root: Path, groups_from: str) -> dict[str, object]:
    samples = scan_dataset(root)
    feats = [features(load_image(s.path)) for s in samples]
    y = np.array([s.label for s in samples])
    if groups_from == "patient":
        groups = np.array([f"{s.class_name}/{s.patient_id}" for s in samples])
    else:
        groups = index_blocks(samples)
    cv = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
    out: dict[str, object] = {"n": len(samples), "groups": int(len(set(groups.tolist())))}
    for name, idx in (("global_stats", 0), ("thumbnail_16px", 1)):
        x = np.stack([f[idx] for f in feats])
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
        acc = cross_val_score(model, x, y, cv=cv, groups=groups, scoring="accuracy")
        out[name] = {
            "accuracy_mean": round(float(acc.mean()), 3),
            "std": round(float(acc.std()), 3),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_real = os.environ.get("KIDNEYSCAN_REAL_DATA", REPO.parent / "shared/data/ct-kidney")
    ap.add_argument("--real", type=Path, default=Path(default_real))
    ap.add_argument("--n", type=int, default=800, help="phantom images")
    ap.add_argument("--image-size", type=int, default=128)
    args = ap.parse_args()
    result: dict[str, object] = {
        "command": f"python benchmarks/phantom_shortcuts.py --n {args.n} "
        f"--image-size {args.image_size}",
        "chance": 0.25,
    }
    # one site: class vs. rendering only; three sites: plus the site mix (patient size, noise,
    # field of view differ by site and so do class mixes, which links them when pooled)
    for sites in (1, 3):
        with tempfile.TemporaryDirectory() as tmp:
            generate_dataset(tmp, args.n, seed=0, sites=sites, image_size=args.image_size)
            result[f"phantom_{sites}_site{'s' if sites > 1 else ''}"] = probe(Path(tmp), "patient")
    if args.real.is_dir():
        result["real"] = probe(args.real, "index_blocks")
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "phantom_shortcuts.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Shortcut probe: trivial features, 5-fold grouped CV (chance 0.25)",
        "",
        f"Command: `{result['command']}`",
        "",
        "| data | images | groups | global grey-level stats acc. | 16x16 thumbnail linear acc. |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in ("phantom_1_site", "phantom_3_sites", "real"):
        r = result.get(key)
        if isinstance(r, dict):
            g, t = r["global_stats"], r["thumbnail_16px"]
            lines.append(
                f"| {key} | {r['n']} | {r['groups']} | {g['accuracy_mean']} ± {g['std']} | "
                f"{t['accuracy_mean']} ± {t['std']} |"
            )
    (RESULTS / "phantom_shortcuts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
