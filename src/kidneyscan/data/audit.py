"""Dataset audit: unreadable files, exact and near duplicates, groups, leakage across a split.

:func:`audit_dataset` reads every image once and returns a JSON-friendly report;
:func:`write_report` writes it as Markdown + JSON + a PNG of pHash distances. The CLI command
``kidneyscan audit`` is a thin wrapper over both.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track
from sklearn.metrics import adjusted_rand_score

from kidneyscan.data.datasets import CLASSES, DataError, Sample, load_image, scan_dataset
from kidneyscan.data.splits import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MAX_GAP,
    DEFAULT_MAX_JUMP,
    Split,
    groups_for,
    hamming_pairs,
    load_split,
    phash,
)

log = logging.getLogger(__name__)

#: Examples listed per finding in the Markdown report (the JSON has them all).
MAX_LISTED = 10


def _clusters(keys: Sequence[str | None]) -> list[list[int]]:
    """Indices sharing a key, for keys shared by two or more samples."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        if k is not None:
            by_key[k].append(i)
    return sorted((v for v in by_key.values() if len(v) > 1), key=lambda v: (-len(v), v[0]))


def _percentiles(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    q = np.percentile(values, [1, 5, 25, 50, 75, 95])
    return {
        "n": int(len(values)),
        **{f"p{p}": float(v) for p, v in zip((1, 5, 25, 50, 75, 95), q, strict=True)},
    }


def _group_stats(groups: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    sizes = np.bincount(groups)
    per_class = {
        CLASSES[c] if c < len(CLASSES) else str(c): int(len(np.unique(groups[labels == c])))
        for c in np.unique(labels)
    }
    mixed = sum(len(np.unique(labels[groups == g])) > 1 for g in np.unique(groups))
    return {
        "n_groups": int(len(sizes)),
        "groups_per_class": per_class,
        "largest": int(sizes.max()) if len(sizes) else 0,
        "median_size": float(np.median(sizes)) if len(sizes) else 0.0,
        "singletons": int((sizes == 1).sum()),
        "mixed_class_groups": int(mixed),
    }


#: Above this many images the distance statistics use a seeded random subset (all pairs of
#: 3,000 images are 4.5 million, a few seconds; of 12,446 they would not fit in memory).
MAX_PAIR_SAMPLES = 3000


def _pair_distances(hashes: np.ndarray, samples: Sequence[Sample], max_gap: int) -> dict[str, Any]:
    """pHash distances of index neighbours vs unrelated pairs (to judge both groupings)."""
    if len(samples) > MAX_PAIR_SAMPLES:
        keep = np.sort(np.random.default_rng(0).choice(len(samples), MAX_PAIR_SAMPLES, False))
        hashes = hashes[keep]
        samples = [samples[i] for i in keep]
    labels = np.array([s.label for s in samples])
    index = np.array([s.index if s.index is not None else -(10**9) for s in samples])
    has_index = np.array([s.index is not None for s in samples])
    all_pairs = hamming_pairs(hashes, 64)  # every pair, with its distance
    i, j, d = all_pairs[:, 0], all_pairs[:, 1], all_pairs[:, 2]
    same = labels[i] == labels[j]
    gap = np.abs(index[i] - index[j])
    indexed = has_index[i] & has_index[j]
    neighbours = same & indexed & (gap <= max_gap)
    far = same & indexed & (gap > 100)
    out: dict[str, Any] = {
        "index_neighbours": _percentiles(d[neighbours]),
        "same_class_far_apart": _percentiles(d[far]),
        "different_class": _percentiles(d[~same]),
    }
    # Kept for the histogram only (not in JSON).
    out["_hist"] = {"index neighbours": d[neighbours], "same class, index gap > 100": d[far]}
    out["_hist"]["different class"] = d[~same]
    return out


def _agreement(blocks: np.ndarray, ph: np.ndarray, near_pairs: np.ndarray) -> dict[str, Any]:
    same_block = blocks[near_pairs[:, 0]] == blocks[near_pairs[:, 1]] if len(near_pairs) else []
    block_pairs = sum(int(c) * (int(c) - 1) // 2 for c in np.bincount(blocks))
    # Pairs in one block that pHash also puts in one cluster.
    both = 0
    for g in np.unique(blocks):
        members = ph[blocks == g]
        both += sum(int(c) * (int(c) - 1) // 2 for c in np.bincount(members))
    return {
        "adjusted_rand_index": float(adjusted_rand_score(blocks, ph)),
        "near_pairs_within_one_block": float(np.mean(same_block)) if len(near_pairs) else None,
        "block_pairs_within_one_phash_cluster": both / block_pairs if block_pairs else None,
    }


def _vs_patients(samples: Sequence[Sample], groupings: dict[str, np.ndarray]) -> dict[str, Any]:
    """How well each grouping recovers the true patients (synthetic data only)."""
    patients = np.array([f"{s.label}:{s.patient_id}" for s in samples])
    out = {}
    for name, g in groupings.items():
        # share of true same-patient pairs that the grouping keeps together (leak protection)
        kept = total = 0
        for p in np.unique(patients):
            members = g[patients == p]
            total += len(members) * (len(members) - 1) // 2
            kept += sum(int(c) * (int(c) - 1) // 2 for c in np.bincount(members))
        out[name] = {
            "adjusted_rand_index": float(adjusted_rand_score(patients, g)),
            "same_patient_pairs_kept_together": kept / total if total else None,
            "n_groups": int(len(np.unique(g))),
            "n_patients": int(len(np.unique(patients))),
        }
    return out


def _split_leakage(
    split: Split,
    samples: Sequence[Sample],
    groupings: dict[str, np.ndarray],
    file_dups: list[list[int]],
    near_pairs: np.ndarray,
) -> dict[str, Any]:
    where = {s.path.resolve(): name for name, members in split.items() for s in members}
    assigned = [where.get(s.path.resolve()) for s in samples]
    out: dict[str, Any] = {
        "source": split.info.get("source"),
        "sizes": {k: len(v) for k, v in split.items()},
        "images_in_no_split": sum(a is None for a in assigned),
        "crossing": {},
    }
    csv_groups = np.array([split.groups.get(s.path, -1) for s in samples])
    kinds = {**groupings, "csv group column": csv_groups}
    for name, g in kinds.items():
        members: dict[int, set[str]] = defaultdict(set)
        counts: dict[int, int] = defaultdict(int)
        for gi, a in zip(g, assigned, strict=True):
            if a is not None and gi >= 0:
                members[int(gi)].add(a)
                counts[int(gi)] += 1
        crossing = {gi: sorted(v) for gi, v in members.items() if len(v) > 1}
        out["crossing"][name] = {
            "groups": len(crossing),
            "of_groups": len(members),
            "images_in_crossing_groups": sum(counts[gi] for gi in crossing),
            "examples": [
                {"group": gi, "splits": v, "size": counts[gi]} for gi, v in list(crossing.items())
            ][:MAX_LISTED],
        }
    out["exact_duplicates_across_splits"] = sum(
        len({assigned[i] for i in c if assigned[i] is not None}) > 1 for c in file_dups
    )
    # The practical question: how many evaluation images have a near copy in training?
    train_near: dict[str, set[int]] = defaultdict(set)
    for i, j, _ in near_pairs:
        for a, b in ((i, j), (j, i)):
            if assigned[b] == "train" and assigned[a] not in (None, "train"):
                train_near[str(assigned[a])].add(int(a))
    out["held_out_with_near_duplicate_in_train"] = {
        name: {"images": len(train_near[name]), "of": len(members)}
        for name, members in split.items()
        if name != "train"
    }
    out["near_pairs_across_splits"] = int(
        sum(
            assigned[i] is not None and assigned[j] is not None and assigned[i] != assigned[j]
            for i, j in near_pairs[:, :2]
        )
    )
    return out


def audit_dataset(
    root: str | Path,
    *,
    split_csv: str | Path | None = None,
    max_gap: int = DEFAULT_MAX_GAP,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    max_jump: int | None = DEFAULT_MAX_JUMP,
    progress: bool = False,
) -> dict[str, Any]:
    """Audit a CT-KIDNEY / ImageFolder dataset for duplicates, groups and split leakage.

    Parameters
    ----------
    root
        Dataset folder (see :func:`~kidneyscan.data.datasets.scan_dataset`).
    split_csv
        Optional split CSV (``kidneyscan split``); groups spanning its splits are reported.
    max_gap, max_distance, max_jump
        Grouping parameters, as for :func:`~kidneyscan.data.splits.groups_for`.
    progress
        Show a progress bar while reading images.

    Returns
    -------
    dict
        JSON-friendly report (keys ``dataset``, ``unreadable``, ``exact_duplicates``,
        ``near_duplicates``, ``groupings``, ``agreement``, ``phash_distances``, and ``split``
        when a split was given, ``vs_patients`` when patient ids are known). Keys starting with
        ``_`` hold arrays for the plots and are dropped from the JSON.
    """
    root = Path(root)
    samples = scan_dataset(root)
    split = load_split(split_csv, root=root) if split_csv is not None else None
    n = len(samples)
    file_sha: list[str | None] = [None] * n
    pixel_sha: list[str | None] = [None] * n
    hashes = np.zeros((n, 64), dtype=bool)
    readable = np.ones(n, dtype=bool)
    unreadable = []
    sizes: dict[str, int] = defaultdict(int)
    items: Sequence[tuple[int, Sample]] | Any = list(enumerate(samples))
    if progress:
        items = track(items, description="reading images", total=n, transient=True)
    for i, s in items:
        try:
            data = s.path.read_bytes()
            image = load_image(s.path)
        except (OSError, DataError) as exc:
            readable[i] = False
            unreadable.append({"path": _rel(root, s.path), "reason": str(exc)})
            continue
        file_sha[i] = hashlib.sha256(data).hexdigest()
        shape = f"{image.shape[0]}x{image.shape[1]}"
        sizes[shape] += 1
        pixel_sha[i] = hashlib.sha256(shape.encode() + image.tobytes()).hexdigest()
        hashes[i] = phash(image)
    ok = np.nonzero(readable)[0]
    good = [samples[i] for i in ok]
    labels = np.array([s.label for s in good])
    h = hashes[ok]

    def describe(cluster: list[int]) -> dict[str, Any]:
        classes = sorted({samples[i].class_name for i in cluster})
        return {"paths": [_rel(root, samples[i].path) for i in cluster], "classes": classes}

    file_dups = _clusters(file_sha)
    pixel_dups = _clusters(pixel_sha)
    near = hamming_pairs(h, max_distance)
    near_full = np.column_stack([ok[near[:, 0]], ok[near[:, 1]], near[:, 2]]) if len(near) else near
    blocks = groups_for(good, grouping="blocks", max_gap=max_gap)
    ph = groups_for(good, grouping="phash", max_distance=max_distance, hashes=h)
    union = groups_for(
        good,
        grouping="blocks+phash",
        max_gap=max_gap,
        max_distance=max_distance,
        max_jump=max_jump,
        hashes=h,
    )
    near_clusters = _clusters([str(g) for g in ph])
    cross_pairs = [
        {
            "a": _rel(root, good[i].path),
            "b": _rel(root, good[j].path),
            "distance": int(d),
        }
        for i, j, d in near
        if good[i].label != good[j].label
    ]
    groupings = {"blocks": blocks, "phash": ph, "blocks+phash": union}
    report: dict[str, Any] = {
        "dataset": {
            "root": str(root),
            "n_images": n,
            "per_class": {c: int((labels == k).sum()) for k, c in enumerate(CLASSES)},
            "image_sizes": dict(sizes),
            "params": {
                "max_gap": max_gap,
                "max_distance": max_distance,
                "max_jump": max_jump,
                "hash_bits": 64,
            },
        },
        "unreadable": unreadable,
        "exact_duplicates": {
            "file_sha256_clusters": [describe(c) for c in file_dups],
            "pixel_sha256_clusters": [describe(c) for c in pixel_dups],
            "images_in_file_clusters": sum(len(c) for c in file_dups),
            "images_in_pixel_clusters": sum(len(c) for c in pixel_dups),
            "cross_class_pixel_clusters": sum(
                len({samples[i].label for i in c}) > 1 for c in pixel_dups
            ),
        },
        "near_duplicates": {
            "pairs": int(len(near)),
            "identical_hash_pairs": int((near[:, 2] == 0).sum()) if len(near) else 0,
            "clusters": len(near_clusters),
            "images_in_clusters": sum(len(c) for c in near_clusters),
            "largest_cluster": max((len(c) for c in near_clusters), default=0),
            "cross_class_pairs": cross_pairs,
            "cluster_examples": [
                {"paths": [_rel(root, good[i].path) for i in c]} for c in near_clusters[:MAX_LISTED]
            ],
        },
        "groupings": {k: _group_stats(g, labels) for k, g in groupings.items()},
        "agreement": _agreement(blocks, ph, near),
        "phash_distances": _pair_distances(h, good, max_gap),
    }
    if good and all(s.patient_id for s in good):
        report["vs_patients"] = _vs_patients(good, groupings)
    if split is not None:
        full = {k: np.full(n, -1, dtype=np.int64) for k in groupings}
        for k, g in groupings.items():
            full[k][ok] = g
        report["split"] = _split_leakage(split, samples, full, file_dups, near_full)
    return report


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def to_markdown(report: dict[str, Any], *, command: str | None = None) -> str:
    """Render an audit report as Markdown (examples capped at :data:`MAX_LISTED`)."""
    ds = report["dataset"]
    ed = report["exact_duplicates"]
    nd = report["near_duplicates"]
    p = ds["params"]
    lines = [f"# Data audit: `{ds['root']}`", ""]
    if command:
        lines += [f"Produced by `{command}`.", ""]
    lines += [
        f"- images: **{ds['n_images']}** "
        + ", ".join(f"{c} {k}" for c, k in ds["per_class"].items()),
        f"- image sizes: {', '.join(f'{k} ({v})' for k, v in ds['image_sizes'].items())}",
        f"- unreadable: **{len(report['unreadable'])}**",
        f"- parameters: index gap <= {p['max_gap']}, pHash distance <= {p['max_distance']}"
        f" of {p['hash_bits']} bits, blocks cut where neighbours differ by more than"
        f" {p['max_jump']} bits (in blocks+phash)",
        "",
        "## Exact duplicates",
        "",
        f"- identical files (SHA-256 of bytes): {len(ed['file_sha256_clusters'])} clusters,"
        f" {ed['images_in_file_clusters']} images",
        f"- identical pixels (SHA-256 of decoded pixels): {len(ed['pixel_sha256_clusters'])}"
        f" clusters, {ed['images_in_pixel_clusters']} images,"
        f" {ed['cross_class_pixel_clusters']} spanning classes",
    ]
    for c in ed["pixel_sha256_clusters"][:MAX_LISTED]:
        lines.append(f"  - {', '.join(f'`{x}`' for x in c['paths'])} ({'/'.join(c['classes'])})")
    lines += [
        "",
        "## Near duplicates (pHash)",
        "",
        f"- pairs within {p['max_distance']} bits: {nd['pairs']}"
        f" ({nd['identical_hash_pairs']} with identical hashes)",
        f"- clusters (single linkage): {nd['clusters']}, holding {nd['images_in_clusters']}"
        f" images; largest {nd['largest_cluster']}",
        f"- pairs across classes: **{len(nd['cross_class_pairs'])}**",
    ]
    for pair in nd["cross_class_pairs"][:MAX_LISTED]:
        lines.append(f"  - `{pair['a']}` ~ `{pair['b']}` (distance {pair['distance']})")
    lines += [
        "",
        "## Groups",
        "",
        "| grouping | groups | per class | largest | median size | singletons | mixed-class |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in report["groupings"].items():
        per = ", ".join(f"{c} {k}" for c, k in g["groups_per_class"].items())
        lines.append(
            f"| {name} | {g['n_groups']} | {per} | {g['largest']} | {g['median_size']:g}"
            f" | {g['singletons']} | {g['mixed_class_groups']} |"
        )
    ag = report["agreement"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f} %"

    lines += [
        "",
        "## Do index blocks and pHash agree?",
        "",
        f"- adjusted Rand index (blocks vs pHash clusters): {ag['adjusted_rand_index']:.3f}",
        f"- near-duplicate pairs that lie in one index block: "
        f"{pct(ag['near_pairs_within_one_block'])}",
        f"- same-block pairs that pHash also clusters together: "
        f"{pct(ag['block_pairs_within_one_phash_cluster'])}",
        "",
        "pHash distance (bits of 64) by kind of pair:",
        "",
        "| pairs | n | p1 | p5 | p25 | median | p75 | p95 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, q in report["phash_distances"].items():
        if name.startswith("_") or q is None:
            continue
        lines.append(
            f"| {name.replace('_', ' ')} | {q['n']} | {q['p1']:g} | {q['p5']:g} | {q['p25']:g}"
            f" | {q['p50']:g} | {q['p75']:g} | {q['p95']:g} |"
        )
    if "vs_patients" in report:
        lines += [
            "",
            "## Groupings vs true patients (synthetic data)",
            "",
            "| grouping | groups | patients | ARI | same-patient pairs kept together |",
            "|---|---|---|---|---|",
        ]
        for name, v in report["vs_patients"].items():
            lines.append(
                f"| {name} | {v['n_groups']} | {v['n_patients']} | {v['adjusted_rand_index']:.3f}"
                f" | {pct(v['same_patient_pairs_kept_together'])} |"
            )
    if "split" in report:
        sp = report["split"]
        lines += [
            "",
            f"## Leakage across the split `{sp['source']}`",
            "",
            f"- sizes: {', '.join(f'{k} {v}' for k, v in sp['sizes'].items())};"
            f" images in no split: {sp['images_in_no_split']}",
            f"- exact-duplicate clusters across splits: {sp['exact_duplicates_across_splits']}",
            f"- near-duplicate pairs across splits: {sp['near_pairs_across_splits']}",
            "- held-out images with a near duplicate in train: "
            + ", ".join(
                f"{k} {v['images']} of {v['of']}"
                for k, v in sp["held_out_with_near_duplicate_in_train"].items()
            ),
            "",
            "| grouping | groups crossing splits | of groups | images in them |",
            "|---|---|---|---|",
        ]
        for name, v in sp["crossing"].items():
            lines.append(
                f"| {name} | **{v['groups']}** | {v['of_groups']}"
                f" | {v['images_in_crossing_groups']} |"
            )
    if report["unreadable"]:
        lines += ["", "## Unreadable files", ""]
        lines += [f"- `{u['path']}`: {u['reason']}" for u in report["unreadable"][:MAX_LISTED]]
    return "\n".join(lines) + "\n"


def plot_distances(report: dict[str, Any], path: str | Path) -> Path:
    """Histogram of pHash distances per kind of pair, with the near-duplicate threshold."""
    # Imported here: selecting the Agg backend must happen when a figure is drawn, not as a
    # side effect of importing the data layer (a notebook keeps its own backend).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["phash_distances"]["_hist"]
    thr = report["dataset"]["params"]["max_distance"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    bins = [b - 0.5 for b in range(0, 66, 2)]
    for name, values in hist.items():
        if len(values):
            ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.8, label=name)
    ax.axvline(thr + 0.5, color="k", linestyle="--", linewidth=1, label=f"threshold {thr}")
    ax.set_xlabel("pHash Hamming distance (bits of 64)")
    ax.set_ylabel("share of pairs")
    ax.set_xlim(-1, 48)
    ax.set_title("Near-duplicate threshold vs pair distances")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_pairs(report: dict[str, Any], path: str | Path, *, max_pairs: int = 6) -> Path | None:
    """Side-by-side thumbnails of near-duplicate pairs across classes (the ones to look at).

    Falls back to the first pairs of the largest near-duplicate cluster when no pair crosses
    classes; returns None when there is nothing to show.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(report["dataset"]["root"])
    nd = report["near_duplicates"]
    pairs = [(p["a"], p["b"], f"distance {p['distance']}") for p in nd["cross_class_pairs"]]
    title = "Near duplicates across classes"
    if not pairs and nd["cluster_examples"]:
        members = nd["cluster_examples"][0]["paths"]
        pairs = [(members[0], m, "same cluster") for m in members[1:]]
        title = "Largest near-duplicate cluster"
    pairs = pairs[:max_pairs]
    if not pairs:
        return None
    fig, axes = plt.subplots(len(pairs), 2, figsize=(5, 2.5 * len(pairs)), dpi=100, squeeze=False)
    for row, (a, b, note) in enumerate(pairs):
        for col, rel in enumerate((a, b)):
            ax = axes[row][col]
            try:
                ax.imshow(load_image(root / rel), cmap="gray", vmin=0, vmax=1)
            except DataError:
                ax.text(0.5, 0.5, "unreadable", ha="center")
            ax.set_title(f"{rel}" + (f"  ({note})" if col == 1 else ""), fontsize=7)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(
    report: dict[str, Any], out_md: str | Path, *, command: str | None = None
) -> list[Path]:
    """Write ``report.md``, ``report.json``, ``report_phash.png`` and ``report_pairs.png``.

    Returns the paths written (the pairs figure only when there are near duplicates).
    """
    md = Path(out_md)
    if md.suffix.lower() != ".md":
        md = md.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(to_markdown(report, command=command))
    js = md.with_suffix(".json")
    js.write_text(json.dumps(_jsonable(report), indent=2))
    png = plot_distances(report, md.with_name(md.stem + "_phash.png"))
    pairs = plot_pairs(report, md.with_name(md.stem + "_pairs.png"))
    return [md, js, png] + ([pairs] if pairs is not None else [])
