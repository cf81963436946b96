"""Benchmark: can the default model's frozen CT features tell the phantom's classes apart?

A linear probe, the cheapest measure of the phantom's realism to a CT-pretrained encoder: a
phantom of ``--n`` slices from ``--sites`` hospitals is generated, the fully frozen default
backbone (CT ResNet-152, kidney-band crop) featurises every slice once (the project's feature
cache), and a logistic regression on the mean- and max-pooled feature map is scored with
k-fold cross-validation grouped by phantom patient (no patient in two folds). Reported: the
4-class macro-F1 of the pooled out-of-fold predictions with a 95 % bootstrap CI, per-class
recall, and the binary macro-F1 of Normal against each lesion class on the same folds. On the
real sample the same probe scores 0.70 on unseen patients (``benchmarks/real_sample.py``,
row ``probe``; there with mean pooling).

Writes ``benchmarks/results/phantom_ct_probe.{json,md}``; the phantom goes to
``benchmarks/out/phantom_ct_probe/`` (git-ignored).

Usage::

    python benchmarks/phantom_ct_probe.py                    # 600 slices, 512 px, 3 sites
    python benchmarks/phantom_ct_probe.py --n 200 --image-size 256
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kidneyscan.data.datasets import CLASSES, scan_dataset
from kidneyscan.data.phantom import generate_dataset
from kidneyscan.data.splits import make_kfold
from kidneyscan.evaluation.metrics import classification_metrics

ROOT = Path(__file__).resolve().parents[1]


def pooled_features(data: Path) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Mean+max pooled frozen CT features, labels and paths of every slice; extraction seconds."""
    from kidneyscan.config import ExperimentConfig
    from kidneyscan.experiment import build_model, make_preprocessor
    from kidneyscan.features import FeatureStore
    from kidneyscan.models.frozen import FrozenSplit

    cfg = ExperimentConfig()
    full = cfg.replace(model_kwargs={**cfg.model_kwargs, "freeze_fraction": 1.0})
    model, _ = build_model(full, len(CLASSES))
    store = FeatureStore(FrozenSplit(model), make_preprocessor(full))
    samples = scan_dataset(data)
    t0 = time.perf_counter()
    feats = store.load(samples, progress=True, desc="CT features")
    seconds = time.perf_counter() - t0
    fmap = feats.features[:, 0].float()
    x = np.concatenate([fmap.mean(dim=(2, 3)).numpy(), fmap.amax(dim=(2, 3)).numpy()], axis=1)
    return x, feats.labels.numpy(), [str(s.path) for s in samples], seconds


def probe(x: np.ndarray, y: np.ndarray, fold_of: np.ndarray) -> np.ndarray:
    """Out-of-fold class probabilities of a standardised, L2-regularised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = np.unique(y)
    out = np.zeros((len(y), len(classes)))
    for k in np.unique(fold_of):
        test = fold_of == k
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        clf.fit(x[~test], y[~test])
        out[test] = clf.predict_proba(x[test])
    return out


def main(argv: list[str] | None = None) -> int:
    """Generate the phantom, extract, probe, write the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=600, help="phantom slices (default 600)")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7, help="phantom and fold seed (default 7)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/phantom_ct_probe")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args(argv)
    if args.n < 8 * args.folds:
        ap.error(f"--n {args.n} is too small for {args.folds} folds (need >= {8 * args.folds})")

    data = args.out / f"phantom_n{args.n}_s{args.image_size}_seed{args.seed}"
    t0 = time.perf_counter()
    if not (data / "kidneyData.csv").exists():
        print(f"phantom: {args.n} slices of {args.image_size} px -> {data}", flush=True)
        generate_dataset(
            data,
            args.n,
            seed=args.seed,
            sites=args.sites,
            image_size=args.image_size,
            progress=True,
        )
    gen_s = time.perf_counter() - t0
    x, y, paths, feat_s = pooled_features(data)
    samples = scan_dataset(data)
    folds = make_kfold(samples, args.folds, grouping="patient", seed=args.seed)
    fold_by_path = {str(s.path): i for i in range(args.folds) for s in folds[f"fold{i}"]}
    fold_of = np.array([fold_by_path[p] for p in paths])

    t1 = time.perf_counter()
    p4 = probe(x, y, fold_of)
    m4 = classification_metrics(y, p4, CLASSES, n_bootstrap=args.bootstrap)
    result: dict[str, Any] = {
        "four_class": {
            "macro_f1": m4["macro"]["f1"],
            "ci": m4.get("ci95", {}).get("macro_f1"),
            "recall": {c: m4["per_class"][c]["recall"] for c in CLASSES},
        },
        "normal_vs": {},
    }
    normal = CLASSES.index("Normal")
    for c in CLASSES:
        if c == "Normal":
            continue
        keep = (y == normal) | (y == CLASSES.index(c))
        yb = (y[keep] == CLASSES.index(c)).astype(int)
        pb = probe(x[keep], yb, fold_of[keep])
        mb = classification_metrics(yb, pb, ["Normal", c], n_bootstrap=0)
        result["normal_vs"][c] = mb["macro"]["f1"]
    probe_s = time.perf_counter() - t1

    cmd = "python benchmarks/phantom_ct_probe.py " + shlex.join(argv or sys.argv[1:])
    meta = {
        "command": cmd.strip(),
        "n": args.n,
        "image_size": args.image_size,
        "sites": args.sites,
        "seed": args.seed,
        "folds": args.folds,
        "patients": len(set(s.patient_id for s in samples)),
        "features": int(x.shape[1]),
        "seconds": {"phantom": gen_s, "features": feat_s, "probe": probe_s},
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }
    f4 = result["four_class"]
    ci = f4["ci"]
    ci_txt = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    md = [
        f"Command: `{meta['command']}`",
        "",
        f"Phantom: {args.n} slices of {args.image_size} px from {args.sites} sites (seed "
        f"{args.seed}), {meta['patients']} patients, {args.folds} folds grouped by patient. "
        f"Features: frozen CT ResNet-152 (default model, kidney band), mean+max pooled "
        f"({meta['features']} numbers); logistic regression C=0.1. Chance is 0.25 (4-class) and "
        f"0.5 (binary).",
        "",
        "| probe | macro-F1 | " + " | ".join(f"recall {c}" for c in CLASSES) + " |",
        "|---|---|" + "---|" * len(CLASSES),
        f"| 4 classes | {f4['macro_f1']:.3f}{ci_txt} | "
        + " | ".join(f"{f4['recall'][c]:.2f}" for c in CLASSES)
        + " |",
        "",
        "| Normal vs | " + " | ".join(result["normal_vs"]) + " |",
        "|---|" + "---|" * len(result["normal_vs"]),
        "| binary macro-F1 | "
        + " | ".join(f"{v:.3f}" for v in result["normal_vs"].values())
        + " |",
        "",
        f"Time: phantom {gen_s:.0f} s, feature extraction {feat_s:.0f} s (0 when cached), "
        f"probes {probe_s:.0f} s.",
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "phantom_ct_probe.json").write_text(
        json.dumps({"meta": meta, **result}, indent=2)
    )
    (args.results / "phantom_ct_probe.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
