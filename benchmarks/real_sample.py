"""Benchmark: the default recipe and its alternatives on the real CT-KIDNEY sample, 5 folds of
contiguous index bands.

The sample has no patient IDs; a band (one fifth of each class's file numbers) holds whole
patients, so only patients at a band's two ends can be shared with the neighbouring band (the
strictest grouping available; index blocks and near-duplicate clusters still leak). Fold k
tests on band k of every class, validates (early stopping, temperature) on band k+1 and trains
on the other three. Every row but the linear probes is the product's own central training
(:func:`kidneyscan.experiment.train_central`) on a saved split file; the probes are logistic
regression on the same cached frozen features.

Reported per row: macro-F1 over the 1,000 pooled out-of-fold predictions with a 95 % bootstrap
CI, the mean and SD of the five per-fold macro-F1, stone recall, ECE (calibrated on the
validation band), wall time of training (and of feature extraction, which the cache does once
per backbone and preprocessing). Writes ``benchmarks/results/real_sample.{json,md,png}``; run
folders go to ``benchmarks/out/real_sample/`` (git-ignored).

Usage::

    python benchmarks/real_sample.py --data ../shared/data/ct-kidney            # every row
    python benchmarks/real_sample.py --rows default,probe                        # some rows
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kidneyscan.cli._logging import setup_console_logging
from kidneyscan.config import ExperimentConfig
from kidneyscan.data.datasets import CLASSES, scan_dataset
from kidneyscan.data.splits import make_kfold, save_split
from kidneyscan.evaluation.metrics import classification_metrics
from kidneyscan.experiment import build_model, make_preprocessor, train_central

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kidney_pool import kidney_pooled, kidney_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ExperimentConfig()
WHOLE = {"steps": [], "image_size": 224, "image_width": 224}
BAND = list(DEFAULT.steps)
BILATERAL = [*BAND, {"name": "smooth_bilateral"}]


def _cfg(**changes: Any) -> ExperimentConfig:
    train = changes.pop("train", {})
    return DEFAULT.replace(**changes, train={**train}) if train else DEFAULT.replace(**changes)


#: row name -> (description, config, linear probe instead of training)
ROWS: dict[str, tuple[str, ExperimentConfig, bool]] = {
    "default": ("hybrid, CT backbone frozen, kidney band (the default recipe)", DEFAULT, False),
    "probe": ("linear probe, CT backbone, kidney band", DEFAULT, True),
    "tokens14": (
        "hybrid, CT backbone frozen, kidney band, all 14 x 21 layer3 tokens (no 2 x 2 pooling)",
        _cfg(model_kwargs={**DEFAULT.model_kwargs, "token_pool": 1}),
        False,
    ),
    # PatchDropout over the 14 x 21 grid: 74 of the 294 tokens per training sample, about the
    # default's 77 (its training step cost); inference on all 294.
    "tokens14_drop75": (
        "hybrid, CT backbone frozen, kidney band, 14 x 21 layer3 tokens, 75 % token dropout",
        _cfg(model_kwargs={**DEFAULT.model_kwargs, "token_pool": 1, "token_drop": 0.75}),
        False,
    ),
    # Token dropout on the default 7 x 11 grid and harder dropout on the full grid: fewer
    # tokens per training step make the step on cached features cheaper (issue: cached
    # epochs >= 10x uncached at equal accuracy); inference still sees every token.
    "default_drop50": (
        "hybrid, CT backbone frozen, kidney band, 7 x 11 tokens, 50 % token dropout",
        _cfg(model_kwargs={**DEFAULT.model_kwargs, "token_drop": 0.5}),
        False,
    ),
    "default_drop75": (
        "hybrid, CT backbone frozen, kidney band, 7 x 11 tokens, 75 % token dropout",
        _cfg(model_kwargs={**DEFAULT.model_kwargs, "token_drop": 0.75}),
        False,
    ),
    "tokens14_drop90": (
        "hybrid, CT backbone frozen, kidney band, 14 x 21 layer3 tokens, 90 % token dropout",
        _cfg(model_kwargs={**DEFAULT.model_kwargs, "token_pool": 1, "token_drop": 0.9}),
        False,
    ),
    "frozen80": (
        "hybrid, CT backbone 80 % frozen (last 10 blocks trained), kidney band",
        _cfg(
            model_kwargs={**DEFAULT.model_kwargs, "freeze_fraction": 0.8, "token_stage": -1},
            train={"epochs": 4, "lr": 3e-4},
        ),
        False,
    ),
    # Does a DIP step help? Screened with the probe (one feature extraction each, ~5 min with
    # bf16): the step runs on the kidney-band crop, before the backbone's normalisation.
    # The kidney mask as a pooling prior: the whole-map mean next to a mean over the cells the
    # anatomy segmentation calls kidney (benchmarks/_kidney_pool.py).
    "probe_kidney": (
        "linear probe, CT backbone, kidney band, whole-map mean + kidney-mask mean",
        DEFAULT,
        True,
    ),
    # The same prior in pixels: all but the (dilated) kidneys set to fat grey before the
    # backbone (the demo's preprocessing; on the phantom it lifts the probe from 0.41 to 0.6).
    "probe_masked": (
        "linear probe, CT backbone, kidney band with all but the kidneys masked",
        _cfg(steps=[{"name": "crop_kidney_band_masked"}]),
        True,
    ),
    "masked": (
        "the default recipe (hybrid, CT backbone frozen) on the kidney band with all but the "
        "kidneys masked",
        _cfg(steps=[{"name": "crop_kidney_band_masked"}]),
        False,
    ),
    "probe_clahe": (
        "linear probe, CT backbone, kidney band + CLAHE",
        _cfg(steps=[*BAND, {"name": "clahe"}]),
        True,
    ),
    "probe_bilateral": (
        "linear probe, CT backbone, kidney band + bilateral smoothing",
        _cfg(steps=BILATERAL),
        True,
    ),
    "probe_restore": (
        "linear probe, CT backbone, kidney band + restore_auto (detected noise -> filter)",
        _cfg(steps=[*BAND, {"name": "restore_auto"}]),
        True,
    ),
    "bilateral": (
        "the default recipe (hybrid, CT backbone frozen, kidney band) + bilateral smoothing",
        _cfg(steps=BILATERAL),
        False,
    ),
    # The two changes that each beat the default (full token grid with dropout; bilateral
    # smoothing), together: do their gains add? (2026-12-07, stopped after two folds: 0.601,
    # 0.682, below the full grid alone on both; README.)
    "tokens14_drop75_bilateral": (
        "hybrid, CT backbone frozen, kidney band + bilateral smoothing, 14 x 21 layer3 tokens, "
        "75 % token dropout",
        _cfg(
            steps=BILATERAL,
            model_kwargs={**DEFAULT.model_kwargs, "token_pool": 1, "token_drop": 0.75},
        ),
        False,
    ),
    "whole": ("hybrid, CT backbone frozen, whole slice 224 x 224", _cfg(**WHOLE), False),
    "probe_whole": ("linear probe, CT backbone, whole slice 224 x 224", _cfg(**WHOLE), True),
    "lite0": (
        "hybrid, EfficientNet-Lite0 ImageNet frozen, kidney band",
        _cfg(
            model_kwargs={"backbone": "tf_efficientnet_lite0", "freeze_fraction": 1.0},
            weights="efficientnet-lite0",
        ),
        False,
    ),
    "scratch": (
        "hybrid, ConvNeXt-atto from scratch (pixels, 96 x 144), kidney band",
        _cfg(
            model_kwargs={"backbone": "convnext_atto", "depth": 1},
            image_size=96,
            image_width=144,
            weights="none",
            train={"epochs": 12, "cache_images": True},
        ),
        False,
    ),
}


def band_splits(data: Path, out: Path, k: int, seed: int) -> list[Path]:
    """Split CSVs: fold i tests on band i, validates on band i+1, trains on the rest."""
    samples = scan_dataset(data)
    folds = make_kfold(samples, k, grouping="bands", seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(k):
        parts = {
            "test": folds[f"fold{i}"],
            "val": folds[f"fold{(i + 1) % k}"],
            "train": [s for j in range(k) if j not in (i, (i + 1) % k) for s in folds[f"fold{j}"]],
        }
        path = out / f"fold{i}.csv"
        save_split(parts, path, root=data, groups=folds.groups)
        paths.append(path)
    return paths


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(paths, labels, calibrated probabilities) of one run's ``predictions.csv``."""
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    labels = np.array([CLASSES.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    return [r["path"] for r in rows], labels, probs


def run_trained(
    cfg: ExperimentConfig, data: Path, splits: list[Path], out: Path
) -> tuple[np.ndarray, np.ndarray, list[float], dict[str, float]]:
    """Train one config on every fold; pooled out-of-fold labels, probs, per-fold F1, times."""
    labels, probs, per_fold = [], [], []
    times = {"train_s": 0.0, "features_s": 0.0}
    for i, split in enumerate(splits):
        res = train_central(data, out / f"fold{i}", cfg, split_file=split, progress=False)
        _, y, p = read_predictions(res.run_dir / "predictions.csv")
        labels.append(y)
        probs.append(p)
        per_fold.append(float(res.metrics["macro"]["f1"]))
        tr = json.loads((res.run_dir / "training.json").read_text())
        times["train_s"] += float(tr["train_seconds"])
        times["features_s"] += float(tr.get("feature_seconds") or 0.0)
        print(f"    fold {i}: macro-F1 {per_fold[-1]:.3f}", flush=True)
    return np.concatenate(labels), np.concatenate(probs), per_fold, times


def run_probe(
    cfg: ExperimentConfig, data: Path, splits: list[Path], kidney: bool = False
) -> tuple[np.ndarray, np.ndarray, list[float], dict[str, float]]:
    """Logistic regression on the mean-pooled cached features of the fully frozen backbone
    (``kidney``: and their kidney-mask mean, :mod:`_kidney_pool`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from kidneyscan.data.splits import load_split
    from kidneyscan.features import FeatureStore
    from kidneyscan.models.frozen import FrozenSplit

    full = cfg.replace(model_kwargs={**cfg.model_kwargs, "freeze_fraction": 1.0})
    model, _ = build_model(full, len(CLASSES))
    store = FeatureStore(FrozenSplit(model), make_preprocessor(full))
    labels, probs, per_fold = [], [], []
    t0 = time.perf_counter()
    t_feat = 0.0
    for split in splits:
        parts = load_split(split, root=data)
        tf = time.perf_counter()
        feats = {n: store.load(parts[n]) for n in ("train", "test")}
        t_feat += time.perf_counter() - tf
        grid = tuple(feats["train"].features.shape[-2:])
        weights = {
            n: kidney_weights(parts[n], feats[n].rois, (grid[0], grid[1])) if kidney else None
            for n in feats
        }

        def pooled(
            name: str, view: int = 0, f: dict[str, Any] = feats, ws: dict[str, Any] = weights
        ) -> np.ndarray:
            fmap = f[name].features[:, view].float().numpy()
            x = fmap.mean(axis=(2, 3))
            w = ws[name]
            if w is None:
                return x
            # The hflip view's features are of the mirrored image: mirror its mask too.
            w = w[..., ::-1] if f[name].views[view] == "hflip" else w
            return np.concatenate([x, kidney_pooled(fmap, w)], axis=1)

        x_tr = np.concatenate([pooled("train", v) for v in range(feats["train"].features.shape[1])])
        y_tr = np.tile(feats["train"].labels.numpy(), feats["train"].features.shape[1])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        clf.fit(x_tr, y_tr)
        p = clf.predict_proba(pooled("test"))
        y = feats["test"].labels.numpy()
        labels.append(y)
        probs.append(p)
        per_fold.append(float(classification_metrics(y, p, CLASSES, n_bootstrap=0)["macro"]["f1"]))
        print(f"    fold {len(per_fold) - 1}: macro-F1 {per_fold[-1]:.3f}", flush=True)
    times = {"train_s": time.perf_counter() - t0 - t_feat, "features_s": t_feat}
    return np.concatenate(labels), np.concatenate(probs), per_fold, times


def _row(name: str, desc: str, result: tuple[Any, ...], bootstrap: int) -> dict[str, Any]:
    labels, probs, per_fold, times = result
    m = classification_metrics(labels, probs, CLASSES, n_bootstrap=bootstrap)
    return {
        "row": name,
        "description": desc,
        "n": int(m["n"]),
        "macro_f1": m["macro"]["f1"],
        "macro_f1_ci95": m.get("ci95", {}).get("macro_f1"),
        "fold_macro_f1": per_fold,
        "fold_mean": float(np.mean(per_fold)),
        "fold_sd": float(np.std(per_fold)),
        "stone_recall": m["stone_vs_rest"]["sensitivity"],
        "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items()},
        "ece": m["ece"],
        "confusion": m.get("confusion_matrix"),
        **times,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| row | macro-F1 [95 % CI] (pooled) | per-fold mean ± SD | stone recall | ECE "
        "| train time (s) | feature extraction (s) |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        ci = r["macro_f1_ci95"] or [float("nan")] * 2
        lines.append(
            f"| {r['description']} | {r['macro_f1']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
            f"{r['fold_mean']:.3f} ± {r['fold_sd']:.3f} | {r['stone_recall']:.3f} | "
            f"{r['ece']:.3f} | {r['train_s']:.0f} | {r['features_s']:.0f} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.2))
    rev = rows[::-1]
    names = [r["description"] for r in rev]
    f1 = np.array([r["macro_f1"] for r in rev])
    ci = np.array([r["macro_f1_ci95"] or [r["macro_f1"]] * 2 for r in rev])
    err = np.stack([f1 - ci[:, 0], ci[:, 1] - f1])
    ax.barh(names, f1, xerr=err, color="#4c72b0", capsize=3)
    for j, r in enumerate(rev):
        ax.plot(r["fold_macro_f1"], [j] * len(r["fold_macro_f1"]), "k.", ms=4)
    ax.set_xlim(0, 1)
    ax.set_xlabel("macro-F1\n(bar: pooled, 95 % CI; dots: the 5 band folds)")
    fig.tight_layout()
    # Long row names push the axes right: save the whole figure, not the default canvas.
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the requested rows and write the results (merged with earlier rows)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/ct-kidney")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/out/real_sample")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--note", default="", help="e.g. 'machine shared with the test suite'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # A per-slice fallback ("no vertebra found") is shown once and counted after each row.
    repeats = setup_console_logging(logging.WARNING)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    splits = band_splits(args.data, args.out / "splits", args.folds, args.seed)
    json_path = args.results / "real_sample.json"
    previous = json.loads(json_path.read_text())["rows"] if json_path.is_file() else []
    done = {r["row"]: r for r in previous if "row" in r}  # rows of this script's format
    # The note is shown on its own next to the command, not repeated inside it.
    given = list(argv if argv is not None else sys.argv[1:])
    shown = [
        a for i, a in enumerate(given) if a != "--note" and (i == 0 or given[i - 1] != "--note")
    ]
    shown = [a for a in shown if not a.startswith("--note=")]
    command = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *shown])

    def write() -> list[dict[str, Any]]:
        """Write the rows done so far (a long run keeps what it measured)."""
        rows = [done[n] for n in ROWS if n in done]
        args.results.mkdir(parents=True, exist_ok=True)
        meta = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {args.threads} threads",
            "note": args.note,
            "folds": args.folds,
        }
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        runs: dict[str, list[str]] = {}
        for r in rows:
            key = f"`{r.get('command', '?')}`" + (f" ({r['note']})" if r.get("note") else "")
            runs.setdefault(key, []).append(r["row"])
        md = [
            "# Real CT-KIDNEY sample: 5-fold contiguous-band cross-validation",
            "",
            _table(rows),
            "",
            f"Machine: {meta['machine']}. Made by:",
            "",
            *[f"- {key}: rows {', '.join(of)}" for key, of in runs.items()],
            "",
        ]
        (args.results / "real_sample.md").write_text("\n".join(md))
        _plot(rows, args.results / "real_sample.png")
        return rows

    for name in names:
        desc, cfg, probe = ROWS[name]
        print(f"{name}: {desc}", flush=True)
        runner: Callable[..., Any] = run_probe if probe else run_trained
        extra = (name == "probe_kidney",) if probe else (args.out / name,)
        t0 = time.perf_counter()
        result = runner(cfg, args.data, splits, *extra)
        done[name] = _row(name, desc, result, args.bootstrap)
        done[name]["wall_s"] = time.perf_counter() - t0
        done[name]["command"] = command
        done[name]["note"] = args.note
        print(f"  pooled macro-F1 {done[name]['macro_f1']:.3f}", flush=True)
        repeats.report()
        write()
    rows = write()
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
