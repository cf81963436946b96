"""Sweep the grouping parameters (index gap, pHash distance) on a dataset; time the hashing.

Writes ``benchmarks/results/data_grouping.json`` and ``.md``. Usage::

    python benchmarks/data_grouping.py ../shared/data/ct-kidney

For each pHash threshold: near-duplicate pairs, how many of them join different classes (on
the real data these are different patients that look alike at 32 x 32 pixels, i.e. false
links), clusters, and the groups per class left by the union with index blocks (few groups per
class make coarse, lumpy splits). For each index gap: blocks per class.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from kidneyscan.data.datasets import CLASSES, load_image, scan_dataset
from kidneyscan.data.splits import groups_for, hamming_pairs, index_blocks, make_split, phash

RESULTS = Path(__file__).resolve().parent / "results"


def _per_class(groups: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    return {c: int(len(np.unique(groups[labels == k]))) for k, c in enumerate(CLASSES)}


def main() -> None:
    """Run the sweep and write the result files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="dataset folder")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_grouping", help="result stem")
    args = parser.parse_args()

    samples = scan_dataset(args.data)
    labels = np.array([s.label for s in samples])
    t0 = time.perf_counter()
    images = [load_image(s.path) for s in samples]
    t1 = time.perf_counter()
    hashes = np.array([phash(im) for im in images])
    t2 = time.perf_counter()

    gaps = []
    for gap in (1, 3, 5, 10, 20, 50):
        gaps.append(
            {
                "max_gap": gap,
                "blocks_per_class": _per_class(index_blocks(samples, max_gap=gap), labels),
            }
        )
    dists = []
    for d in (0, 2, 4, 6, 8, 10):
        pairs = hamming_pairs(hashes, d)
        cross = int((labels[pairs[:, 0]] != labels[pairs[:, 1]]).sum()) if len(pairs) else 0
        ph = groups_for(samples, grouping="phash", max_distance=d, hashes=hashes)
        union = groups_for(samples, grouping="blocks+phash", max_distance=d, hashes=hashes)
        sizes = np.bincount(ph)
        dists.append(
            {
                "max_distance": d,
                "pairs": int(len(pairs)),
                "cross_class_pairs": cross,
                "clusters_2plus": int((sizes > 1).sum()),
                "largest_cluster": int(sizes.max()),
                "union_groups_per_class": _per_class(union, labels),
            }
        )
    jumps = []
    has_patients = all(s.patient_id for s in samples)
    if has_patients:
        from sklearn.metrics import adjusted_rand_score

        patients = np.array([f"{s.label}:{s.patient_id}" for s in samples])
    for jump in (None, 16, 12, 10, 8):
        g = groups_for(samples, grouping="blocks+phash", max_jump=jump, hashes=hashes)
        row: dict = {"max_jump": jump, "groups_per_class": _per_class(g, labels)}
        try:
            split = make_split(samples, grouping="blocks+phash", max_jump=jump, hashes=hashes)
            row["test_per_class"] = split.info["per_split"]["test"]
        except Exception as exc:  # noqa: BLE001 - too few groups is a result here
            row["test_per_class"] = str(exc)
        if has_patients:
            kept = total = 0
            for p in np.unique(patients):
                members = g[patients == p]
                total += len(members) * (len(members) - 1) // 2
                kept += sum(int(c) * (int(c) - 1) // 2 for c in np.bincount(members))
            row["ari_vs_patients"] = float(adjusted_rand_score(patients, g))
            row["same_patient_pairs_kept"] = kept / total if total else None
        jumps.append(row)
    result = {
        "data": str(args.data),
        "n_images": len(samples),
        "machine": f"{platform.processor() or platform.machine()}, shared with other jobs",
        "seconds_load_per_image": (t1 - t0) / len(samples),
        "seconds_phash_per_image": (t2 - t1) / len(samples),
        "gaps": gaps,
        "distances": dists,
        "jumps": jumps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Grouping sweep on `{args.data}` ({len(samples)} images)",
        "",
        f"Command: `python benchmarks/data_grouping.py {args.data}`. Load"
        f" {1000 * result['seconds_load_per_image']:.2f} ms/image, pHash"
        f" {1000 * result['seconds_phash_per_image']:.3f} ms/image (CPU shared with other jobs).",
        "",
        "| max index gap | blocks per class (" + ", ".join(CLASSES) + ") |",
        "|---|---|",
    ]
    lines += [
        f"| {g['max_gap']} | {', '.join(map(str, g['blocks_per_class'].values()))} |" for g in gaps
    ]
    lines += [
        "",
        "| max pHash distance | pairs | cross-class pairs | clusters (2+) | largest |"
        " blocks+phash groups per class (gap 10, jump 12) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {d['max_distance']} | {d['pairs']} | {d['cross_class_pairs']} | {d['clusters_2plus']}"
        f" | {d['largest_cluster']} | {', '.join(map(str, d['union_groups_per_class'].values()))} |"
        for d in dists
    ]
    head = "| max jump | blocks+phash groups per class | test split per class |"
    sep = "|---|---|---|"
    if has_patients:
        head += " ARI vs patients | same-patient pairs kept together |"
        sep += "---|---|"
    lines += ["", head, sep]
    for j in jumps:
        test = j["test_per_class"]
        shown = ", ".join(f"{k} {v}" for k, v in test.items()) if isinstance(test, dict) else test
        line = (
            f"| {'none' if j['max_jump'] is None else j['max_jump']}"
            f" | {', '.join(map(str, j['groups_per_class'].values()))} | {shown} |"
        )
        if has_patients:
            line += f" {j['ari_vs_patients']:.3f} | {100 * j['same_patient_pairs_kept']:.1f} % |"
        lines.append(line)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
