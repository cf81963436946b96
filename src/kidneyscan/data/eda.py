"""Exploratory data analysis of a CT-KIDNEY-style dataset (real or phantom).

:func:`run_eda` counts classes, measures image sizes and grey-level statistics, draws a montage
per class and writes PNG plots, ``eda_summary.json`` and a short Markdown summary. When the folder
holds the phantom's ``phantom_metadata.csv`` it also tabulates the class mix per site and the
contrast phase per class, the two things a reader of a federated experiment wants to check.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.progress import track

from kidneyscan.data.datasets import CLASSES, DataError, Sample, load_image, scan_dataset

log = logging.getLogger(__name__)

#: Pixels above this windowed value count as "inside the scan" (not the black background).
FOREGROUND = 0.05


@dataclass
class EdaResult:
    """What :func:`run_eda` measured and where it wrote it."""

    out_dir: Path
    summary: dict[str, Any]
    files: list[Path] = field(default_factory=list)


def _image_stats(img: np.ndarray) -> dict[str, float]:
    fg = img > FOREGROUND
    vals = img[fg] if fg.any() else img.ravel()
    p1, p50, p99 = np.percentile(vals, [1, 50, 99])
    return {
        "mean": float(img.mean()),
        "std": float(img.std()),
        "foreground_fraction": float(fg.mean()),
        "foreground_mean": float(vals.mean()),
        "p1": float(p1),
        "p50": float(p50),
        "p99": float(p99),
        "saturated_fraction": float((img >= 0.99).mean()),
    }


def _select(samples: list[Sample], max_per_class: int | None, seed: int) -> list[Sample]:
    if max_per_class is None:
        return samples
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for c in CLASSES:
        pool = [s for s in samples if s.class_name == c]
        if len(pool) > max_per_class:
            idx = np.sort(rng.choice(len(pool), max_per_class, replace=False))
            pool = [pool[i] for i in idx]
        out += pool
    return out


def _montage(images: list[np.ndarray], tile: int, cols: int) -> np.ndarray:
    """Grid of images resized to ``tile`` px (uint8); empty cells stay black."""
    rows = max(1, -(-len(images) // cols))
    grid = np.zeros((rows * tile, cols * tile), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        small = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
        grid[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = np.clip(
            small * 255.0 + 0.5, 0, 255
        ).astype(np.uint8)
    return grid


def _read_metadata(root: Path) -> list[dict[str, str]]:
    path = root / "phantom_metadata.csv"
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable metadata csv ({exc})") from exc


def run_eda(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    max_per_class: int | None = None,
    montage_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> EdaResult:
    """Analyse a dataset folder and write plots plus a Markdown / JSON summary.

    Parameters
    ----------
    data_dir : str or Path
        A CT-KIDNEY-layout folder (class sub-folders, optional ``kidneyData.csv``).
    out_dir : str or Path
        Where ``class_counts.png``, ``intensity_histograms.png``, ``image_stats.png``,
        ``montage_<Class>.png``, ``eda_summary.md`` and ``eda_summary.json`` are written.
    max_per_class : int or None
        Read at most this many images per class (random, seeded) for the grey-level
        statistics; class counts always cover every image. None reads all.
    montage_size : int
        Images per class montage (>= 1).
    seed : int
        Seed of the sub-sample and of the montage choice.
    progress : bool
        Show a progress bar while reading images.

    Returns
    -------
    EdaResult
        The summary dictionary and the written files.

    Raises
    ------
    DataError
        If the folder is not a readable dataset (the message names the path).
    """
    # Imported here: selecting the Agg backend must happen when a figure is drawn, not as a
    # side effect of importing the data layer (a notebook keeps its own backend).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if montage_size < 1:
        raise ValueError(f"montage_size must be >= 1, got {montage_size}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    root = Path(data_dir)
    samples = scan_dataset(root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    counts = Counter(s.class_name for s in samples)
    chosen = _select(samples, max_per_class, seed)
    rng = np.random.default_rng(seed)
    montage_ids: dict[str, set[str]] = {}
    for c in CLASSES:
        ids = [s.image_id for s in chosen if s.class_name == c]
        montage_ids[c] = {ids[i] for i in rng.permutation(len(ids))[:montage_size]}

    sizes: Counter[str] = Counter()
    per_class: dict[str, list[dict[str, float]]] = {c: [] for c in CLASSES}
    hist: dict[str, np.ndarray] = {c: np.zeros(64) for c in CLASSES}
    montage_imgs: dict[str, list[np.ndarray]] = {c: [] for c in CLASSES}
    iterator: Any = chosen
    if progress:
        iterator = track(chosen, description="eda")
    for s in iterator:
        img = load_image(s.path)
        sizes[f"{img.shape[1]}x{img.shape[0]}"] += 1
        per_class[s.class_name].append(_image_stats(img))
        fg = img[img > FOREGROUND]
        hist[s.class_name] += np.histogram(fg, bins=64, range=(0.0, 1.0))[0]
        if s.image_id in montage_ids[s.class_name]:
            montage_imgs[s.class_name].append(img)

    stats: dict[str, dict[str, float]] = {}
    for c in CLASSES:
        rows = per_class[c]
        if rows:
            stats[c] = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
            stats[c]["n_measured"] = len(rows)

    # ---- plots -----------------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bars = ax.bar(list(CLASSES), [counts.get(c, 0) for c in CLASSES], color="#4C72B0")
    ax.bar_label(bars)
    ax.set_ylabel("images")
    ax.set_title(f"Class counts ({root.name}, n={len(samples)})")
    fig.tight_layout()
    files.append(_save(fig, out / "class_counts.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    centres = (np.arange(64) + 0.5) / 64
    for c in CLASSES:
        if hist[c].sum():
            ax.plot(centres, hist[c] / hist[c].sum(), label=c)
    ax.set_xlabel("grey level (windowed, 0-1), foreground pixels")
    ax.set_ylabel("fraction of pixels")
    ax.set_title("Grey-level histogram per class")
    ax.legend()
    fig.tight_layout()
    files.append(_save(fig, out / "intensity_histograms.png"))

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    for ax, key, title in zip(
        axes,
        ("foreground_mean", "std", "foreground_fraction"),
        ("mean grey level inside scan", "image std", "scan area fraction"),
        strict=True,
    ):
        present = [c for c in CLASSES if per_class[c]]
        ax.boxplot([[r[key] for r in per_class[c]] for c in present], tick_labels=present)
        ax.set_title(title, fontsize=10)
    fig.suptitle("Per-image statistics by class (a class that differs here is a shortcut risk)")
    fig.tight_layout()
    files.append(_save(fig, out / "image_stats.png"))

    cols = int(np.ceil(np.sqrt(montage_size)))
    for c in CLASSES:
        if montage_imgs[c]:
            grid = _montage(montage_imgs[c], 128, cols)
            path = out / f"montage_{c}.png"
            cv2.imwrite(str(path), grid)
            files.append(path)

    # ---- phantom extras: sites and contrast phase -------------------------------------------
    meta = _read_metadata(root)
    site_mix: dict[str, dict[str, int]] = {}
    phase_mix: dict[str, dict[str, int]] = {}
    if meta:
        sites: dict[str, Counter[str]] = defaultdict(Counter)
        phases: dict[str, Counter[str]] = defaultdict(Counter)
        for m in meta:
            sites[m.get("site", "?")][m.get("Class", "?")] += 1
            phases[m.get("Class", "?")][m.get("contrast_phase", "?")] += 1
        site_mix = {k: dict(v) for k, v in sorted(sites.items())}
        phase_mix = {k: dict(v) for k, v in sorted(phases.items())}
        fig, ax = plt.subplots(figsize=(6, 3.4))
        bottom = np.zeros(len(site_mix))
        names = list(site_mix)
        for c in CLASSES:
            vals = np.array([site_mix[s].get(c, 0) for s in names], dtype=float)
            ax.bar(names, vals, bottom=bottom, label=c)
            bottom += vals
        ax.set_ylabel("images")
        ax.set_title("Class mix per site (non-IID)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(_save(fig, out / "site_class_mix.png"))

    summary: dict[str, Any] = {
        "data_dir": str(root),
        "n_images": len(samples),
        "class_counts": {c: counts.get(c, 0) for c in CLASSES},
        "n_measured": len(chosen),
        "image_sizes": dict(sizes),
        "intensity": stats,
        "site_class_mix": site_mix,
        "contrast_phase_by_class": phase_mix,
    }
    (out / "eda_summary.json").write_text(json.dumps(summary, indent=2))
    files.append(out / "eda_summary.json")
    (out / "eda_summary.md").write_text(_markdown(summary, files, out))
    files.append(out / "eda_summary.md")
    return EdaResult(out, summary, files)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown(summary: dict[str, Any], files: list[Path], out: Path) -> str:
    lines = [
        f"# EDA of `{summary['data_dir']}`",
        "",
        f"{summary['n_images']} images; grey-level statistics on {summary['n_measured']}.",
        "",
        "| class | images | mean grey (scan) | image std | scan area | p1 | p50 | p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in CLASSES:
        st = summary["intensity"].get(c)
        n = summary["class_counts"][c]
        if st:
            lines.append(
                f"| {c} | {n} | {st['foreground_mean']:.3f} | {st['std']:.3f} | "
                f"{st['foreground_fraction']:.3f} | {st['p1']:.3f} | {st['p50']:.3f} | "
                f"{st['p99']:.3f} |"
            )
        else:
            lines.append(f"| {c} | {n} | - | - | - | - | - | - |")
    sizes = ", ".join(f"{k}: {v}" for k, v in sorted(summary["image_sizes"].items()))
    lines += ["", f"Image sizes (width x height: count): {sizes}."]
    if summary["site_class_mix"]:
        lines += ["", "| site | " + " | ".join(CLASSES) + " |", "|---|" + "---:|" * len(CLASSES)]
        for site, mix in summary["site_class_mix"].items():
            lines.append(f"| {site} | " + " | ".join(str(mix.get(c, 0)) for c in CLASSES) + " |")
        lines += ["", "| class | " + " | ".join(("none", "arterial", "portal")) + " |"]
        lines.append("|---|---:|---:|---:|")
        for c, mix in summary["contrast_phase_by_class"].items():
            cells = " | ".join(str(mix.get(p, 0)) for p in ("none", "arterial", "portal"))
            lines.append(f"| {c} | {cells} |")
    lines += ["", "Figures: " + ", ".join(f"`{p.relative_to(out)}`" for p in files), ""]
    return "\n".join(lines)
