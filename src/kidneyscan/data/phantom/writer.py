"""The dataset writer: a balanced plan of patients per site and class, in the CT-KIDNEY layout."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from rich.progress import Progress

from kidneyscan.data.phantom.lesions import STONE_UNENHANCED
from kidneyscan.data.phantom.render import PhantomSlice, iter_patient_slices
from kidneyscan.data.phantom.sites import CLASSES, PHASES, SiteProfile, make_sites

#: Columns of ``phantom_metadata.csv``.
METADATA_COLUMNS: tuple[str, ...] = (
    "image_id",
    "path",
    "Class",
    "target",
    "site",
    "patient_id",
    "slice_index",
    "slice_level",
    "lesion_type",
    "lesion_count",
    "lesion_size_mm",
    "lesion_hu",
    "lesion_side",
    "noise_sigma_hu",
    "blur_mm",
    "contrast_phase",
    "contrast_scale",
    "patient_width_mm",
    "fov_mm",
    "pixel_mm",
    "bowel_contrast",
    "n_phleboliths",
    "vessel_calcification",
)


#: Chance that the file numbering jumps (by 20-200) before a patient, as between scan series.
SERIES_BREAK_PROB = 0.1


def _balanced_counts(n: int, sites: list[SiteProfile]) -> np.ndarray:
    """Site x class image counts: equal class totals overall, each site's own mix and size.

    Iterative proportional fitting of the sites' class weights to row sums (site shares) and
    column sums (n / 4 per class), then largest-remainder rounding so totals are exact.
    """
    k = len(CLASSES)
    w = np.array([s.class_weights for s in sites], dtype=np.float64)
    w = w / w.sum(axis=1, keepdims=True)
    share = np.array([s.share for s in sites], dtype=np.float64)
    rows = n * share / share.sum()
    cols = np.full(k, n / k)
    m = w * rows[:, None]
    for _ in range(200):
        m *= (cols / np.maximum(m.sum(axis=0), 1e-12))[None, :]
        m *= (rows / np.maximum(m.sum(axis=1), 1e-12))[:, None]
    # exact integer column totals (n split as evenly as possible), rows follow
    col_int = np.full(k, n // k)
    col_int[: n % k] += 1
    out = np.floor(m).astype(int)
    for c in range(k):
        missing = col_int[c] - out[:, c].sum()
        order = np.argsort(-(m[:, c] - out[:, c]), kind="stable")
        for i in range(missing):
            out[order[i % len(sites)], c] += 1
    return out


@dataclass
class _Job:
    class_name: str
    site: int
    patient_id: str
    slices: int
    seed: tuple[int, ...]
    phase: str = "none"
    level_u: float | None = None  # stratified position of the slice block (0-1)
    width_u: float | None = None  # stratified patient width within the site's range (0-1)


def _plan(n: int, seed: int, sites: list[SiteProfile]) -> dict[str, list[_Job]]:
    """Patients per class in file order; each gives 1-4 slices with consecutive indices."""
    counts = _balanced_counts(n, sites)
    rng = np.random.default_rng([seed, 1])
    plan: dict[str, list[_Job]] = {}
    pid = 0
    for c, name in enumerate(CLASSES):
        jobs: list[_Job] = []
        for s in range(len(sites)):
            left = int(counts[s, c])
            while left > 0:
                k = min(left, int(rng.integers(1, 5)))
                jobs.append(_Job(name, s, f"P{pid:05d}", k, (seed, 2, pid)))
                pid += 1
                left -= k
            cell = [j for j in jobs if j.site == s]
            _assign_phases(cell, sites[s], rng)
            _stratify(cell, rng)
        order = rng.permutation(len(jobs))  # interleave the sites' patients within a class
        plan[name] = [jobs[i] for i in order]
    return plan


def _assign_phases(jobs: list[_Job], site: SiteProfile, rng: np.random.Generator) -> None:
    """Give each patient of one (site, class) cell a contrast phase, stratified by images.

    Every class gets the site's rates except Stone, scanned without contrast in
    :data:`~kidneyscan.data.phantom.lesions.STONE_UNENHANCED` of its images.

    Drawing the phase independently per patient leaves, in small sets, chance differences of
    20-30 points in the enhanced share between classes: a contrast shortcut. Assigning phases
    greedily to the phase furthest below its target image count keeps every class at the
    site's own rates.
    """
    contrast = site.contrast_prob
    if jobs and jobs[0].class_name == "Stone":
        # stone protocols are unenhanced: the real data's stones are mostly on plain scans
        contrast = min(contrast, 1.0 - STONE_UNENHANCED)
    p_art = contrast * site.arterial_fraction
    target = np.array([1.0 - contrast, p_art, contrast - p_art])
    done = np.zeros(3)
    for i in rng.permutation(len(jobs)):
        total = done.sum() + jobs[i].slices
        deficit = target * total - done + rng.uniform(0, 1e-6, 3)  # random tie-break
        k = int(np.argmax(deficit))
        jobs[i].phase = PHASES[k]
        done[k] += jobs[i].slices


def _stratify(jobs: list[_Job], rng: np.random.Generator) -> None:
    """Latin-hypercube slice level and patient width for the patients of one (site, class) cell.

    Slice level moves the mean grey level a lot (liver and spleen shrink towards the lower
    pole). With ~100 patients per class, independent draws leave chance differences of 0.05
    in mean level between classes, enough for a grey-level classifier to beat chance; one
    draw per equal-probability stratum makes every class cover the range evenly.
    """
    m = len(jobs)
    if m == 0:
        return
    levels = (rng.permutation(m) + rng.random(m)) / m
    widths = (rng.permutation(m) + rng.random(m)) / m
    for job, lu, wu in zip(jobs, levels, widths, strict=True):
        job.level_u, job.width_u = float(lu), float(wu)


def generate_dataset(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    sites: int | Sequence[SiteProfile] = 1,
    image_size: int = 512,
    progress: bool = False,
) -> Path:
    """Write a synthetic dataset in the public CT-KIDNEY layout.

    Layout: ``<out>/<Class>/<Class>- (<k>).jpg`` (8-bit grayscale JPEG, quality 95),
    ``kidneyData.csv`` (columns ``,image_id,path,diag,target,Class``),
    ``masks/<image_id>_{body,kidney,lesion}.png``, ``clean/<image_id>.png`` (noise-free,
    windowed, lossless) and ``phantom_metadata.csv`` (see :data:`METADATA_COLUMNS`).

    Parameters
    ----------
    out_dir : str or Path
        Output folder; created if needed. Existing phantom files of the same names are replaced.
    n : int
        Number of images (>= 1), split evenly over the four classes.
    seed : int
        Seed: the same seed writes the same bytes.
    sites : int or sequence of SiteProfile
        Number of hospitals (profiles from :func:`make_sites`) or explicit profiles.
    image_size : int
        Image side in pixels (>= 32).
    progress : bool
        Show a progress bar (rich) while writing.

    Returns
    -------
    Path
        ``out_dir``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    profiles = make_sites(sites, seed) if isinstance(sites, int) else list(sites)
    if not profiles:
        raise ValueError("sites must be >= 1 or a non-empty list of SiteProfile")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    _clear_previous(out)
    for sub in (*CLASSES, "masks", "clean"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    plan = _plan(n, seed, profiles)

    rows: list[dict[str, Any]] = []
    bar = _progress(progress, n)
    try:
        for c, name in enumerate(CLASSES):
            k = 0
            # like the real sample, file numbers run on across patients but jump now and then
            # (a new scan series): index blocks then hold several patients, never split one
            gaps = np.random.default_rng([seed, 3, c])
            for j, job in enumerate(plan[name]):
                if j and gaps.random() < SERIES_BREAK_PROB:
                    k += int(gaps.integers(20, 200))
                slices = iter_patient_slices(
                    job.seed,
                    name,
                    profiles[job.site],
                    job.slices,
                    image_size,
                    job.phase,
                    job.level_u,
                    job.width_u,
                )
                for i, sl in enumerate(slices):
                    k += 1
                    image_id = f"{name}- ({k})"
                    rel = f"{name}/{image_id}.jpg"
                    _write(out, rel, image_id, sl)
                    m = sl.meta
                    rows.append(
                        {
                            "image_id": image_id,
                            "path": rel,
                            "Class": name,
                            "target": c,
                            "site": m["site"],
                            "patient_id": job.patient_id,
                            "slice_index": i,
                            **{key: m[key] for key in METADATA_COLUMNS if key in m},
                        }
                    )
                    bar(1)
    finally:
        bar(0, close=True)

    with (out / "kidneyData.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "image_id", "path", "diag", "target", "Class"])
        for i, r in enumerate(rows):
            w.writerow([i, r["image_id"], r["path"], r["Class"], r["target"], r["Class"]])
    with (out / "phantom_metadata.csv").open("w", newline="") as fh:
        dw = csv.DictWriter(fh, fieldnames=list(METADATA_COLUMNS))
        dw.writeheader()
        for r in rows:
            dw.writerow({k: r.get(k, "") for k in METADATA_COLUMNS})
    with (out / "phantom_sites.csv").open("w", newline="") as fh:
        dw = csv.DictWriter(fh, fieldnames=list(asdict(profiles[0])))
        dw.writeheader()
        for s in profiles:
            dw.writerow(asdict(s))
    return out


def _clear_previous(out: Path) -> None:
    """Remove the files of an earlier phantom in ``out`` so no stale image survives.

    Only files listed in an earlier ``phantom_metadata.csv`` are removed; a folder holding
    other images (real data, say) is refused rather than mixed with synthetic ones.
    """
    meta = out / "phantom_metadata.csv"
    root = out.resolve()
    if meta.is_file():
        with meta.open(newline="") as fh:
            ids = [(r["image_id"], r["path"]) for r in csv.DictReader(fh) if r.get("path")]
        for image_id, rel in ids:
            for f in (
                out / rel,
                out / "clean" / f"{image_id}.png",
                *(out / "masks" / f"{image_id}_{k}.png" for k in ("body", "kidney", "lesion")),
            ):
                # a hand-edited csv must not delete anything outside the dataset folder
                if f.resolve().is_relative_to(root) and f.parent.resolve() != root:
                    f.unlink(missing_ok=True)
    for c in CLASSES:
        folder = out / c
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(
                f"{out}: {c}/ already holds files that are not from a phantom run; "
                "choose an empty output folder"
            )


def _to_u8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _write(out: Path, rel: str, image_id: str, sl: PhantomSlice) -> None:
    # cv2.imencode + write_bytes: OpenCV's imwrite mishandles some non-ASCII paths
    ok, buf = cv2.imencode(".jpg", _to_u8(sl.image), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise OSError(f"{out / rel}: JPEG encoding failed")
    (out / rel).write_bytes(buf.tobytes())
    for key, mask in sl.masks.items():
        # 1-bit PNG: encodes twice as fast as 8-bit; loads as bool (PIL) or 0/255 (OpenCV)
        Image.fromarray(mask).save(out / "masks" / f"{image_id}_{key}.png", compress_level=1)
    _, b = cv2.imencode(".png", _to_u8(sl.clean), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    (out / "clean" / f"{image_id}.png").write_bytes(b.tobytes())


class _NoBar:
    def __call__(self, step: int, close: bool = False) -> None:
        return None


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return _NoBar()
    prog = Progress()
    prog.start()
    task = prog.add_task("phantom", total=total)

    def advance(step: int, close: bool = False) -> None:
        if step:
            prog.advance(task, step)
        if close:
            prog.stop()

    return advance
