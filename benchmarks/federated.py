"""Centralized vs FedAvg vs FedProx (and FedAvg + DP) on phantom hospitals and real CT-KIDNEY.

Every run goes through the same code path (``kidneyscan.federated.simulation``): same model,
same held-out test set (a leakage-aware split with the same seed), same local recipe (AdamW,
constant LR, label smoothing), same number of passes over every training image.
"Centralized" is one site holding the whole training pool and training for
``rounds x local_epochs`` epochs in one go; the federated runs spread that pool over 3 sites
with Dirichlet(alpha) label skew and run ``rounds`` rounds of ``local_epochs`` epochs.
The selected round is chosen on the sites' own validation hold-out, never on the test set.

Writes ``benchmarks/results/federated.json`` and ``federated.md``. Run::

    python benchmarks/federated.py            # phantom + real data (if present)
    python benchmarks/federated.py --quick    # tiny smoke version
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL = (
    next(
        (p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if (p / "data").is_dir()),
        REPO.parent / "shared",
    )
    / "data"
    / "ct-kidney"
)
BATCH_SIZE = 16
HYBRID_KWARGS = {"backbone": "convnext_atto", "embed_dim": 128, "depth": 1, "num_heads": 8}


def _runs(rounds: int, local_epochs: int, with_dp: bool) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = [
        {
            "name": "centralized",
            "clients": 1,
            "config": {
                "strategy": "fedavg",
                "num-server-rounds": 1,
                "local-epochs": rounds * local_epochs,
                "min-clients": 1,
            },
        },
        {
            "name": "FedAvg",
            "clients": 3,
            "config": {"strategy": "fedavg", "num-server-rounds": rounds},
        },
        {
            "name": "FedProx (mu=0.01)",
            "clients": 3,
            "config": {"strategy": "fedprox", "proximal-mu": 0.01, "num-server-rounds": rounds},
        },
    ]
    if with_dp:
        runs.append(
            {
                "name": "FedAvg + DP (server-fixed)",
                "clients": 3,
                "config": {
                    "strategy": "fedavg",
                    "num-server-rounds": rounds,
                    "dp": "server-fixed",
                    "dp-noise-multiplier": 0.3,
                    "dp-clipping-norm": 5.0,
                    "dp-delta": 1e-5,
                },
            }
        )
    for r in runs:
        if r["name"] != "centralized":
            r["config"]["local-epochs"] = local_epochs
            r["config"]["min-clients"] = 3
    return runs


def _evaluate(run_dir: Path, cfg: dict[str, Any], n_boot: int) -> dict[str, Any]:
    from kidneyscan.data.partition import load_partition
    from kidneyscan.evaluation.metrics import bootstrap_ci, macro_f1
    from kidneyscan.federated import task
    from kidneyscan.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(run_dir / "checkpoint")
    test = load_partition(run_dir / "test.csv")[0]
    scalars, probs, labels = task.evaluate_model(model, test, task.run_config(cfg))
    lo, hi = bootstrap_ci(labels, probs, macro_f1, n=n_boot, seed=0)
    return {
        "macro_f1": scalars["macro-f1"],
        "macro_f1_ci": [float(lo), float(hi)],
        "accuracy": scalars["accuracy"],
        "n_test": len(test),
        "selected_round": meta["training"]["round"],
    }


def run_dataset(
    name: str,
    samples: list[Any],
    out: Path,
    *,
    rounds: int,
    local_epochs: int,
    alpha: float,
    image_size: int,
    with_dp: bool,
    n_boot: int,
) -> list[dict[str, Any]]:
    """All runs of one dataset; returns one result row per run."""
    from kidneyscan.federated.simulation import prepare_run, simulate

    rows = []
    for run in _runs(rounds, local_epochs, with_dp):
        run_dir = out / name / run["name"].split(" ")[0].lower().replace("+", "")
        if "DP" in run["name"]:
            run_dir = out / name / "fedavg_dp"
        prepared = prepare_run(
            samples,
            run_dir,
            num_clients=run["clients"],
            partitioning="dirichlet",
            alpha=alpha,
            min_samples=10,
            test_fraction=0.2,
            local_val_fraction=0.15,
            seed=0,
        )
        cfg = {
            "model": "hybrid",
            "model-kwargs": json.dumps(HYBRID_KWARGS),
            "image-size": image_size,
            "batch-size": BATCH_SIZE,
            "lr": 2e-3,
            "local-val-fraction": 0.15,
            "seed": 0,
            "out-dir": str(run_dir),
            "partition-file": prepared["partition-file"],
            "test-file": prepared["test-file"],
            "split-file": prepared["split-file"],
            "num-clients": run["clients"],
            **run["config"],
        }
        print(f"== {name}: {run['name']} ({run['clients']} site(s))", flush=True)
        t0 = time.perf_counter()
        summary = simulate(cfg, num_clients=run["clients"], cpus_per_client=1.0)
        total = time.perf_counter() - t0
        result = _evaluate(run_dir, cfg, n_boot)
        history = json.loads((run_dir / "curves.json").read_text())
        eps = [r["dp-epsilon"] for r in history if "dp-epsilon" in r]
        rows.append(
            {
                "dataset": name,
                "run": run["name"],
                "sites": run["clients"],
                "rounds": summary["completed_round"],
                "local_epochs": cfg["local-epochs"],
                **result,
                "bytes_up_per_round": float(np.mean(summary["bytes_up_per_round"])),
                "bytes_down_per_round": float(np.mean(summary["bytes_down_per_round"])),
                "rounds_seconds": summary["wall_seconds"],
                "total_seconds": total,
                "epsilon": eps[-1] if eps else None,
                "partition": [p["per_class"] for p in prepared["summary"]],
            }
        )
        print(json.dumps(rows[-1], default=float), flush=True)
    return rows


def cached_copy(src: Path, dst: Path, size: int) -> Path:
    """Area-downsampled PNG copies of a dataset (same class folders and file stems).

    Decoding 512 px JPEGs dominated the run time on the shared CPU; the Preprocessor resizes
    to ``size`` with the same area interpolation anyway, and PNG is lossless, so the model sees
    the same pixels up to one rounding. The copies live under benchmarks/out (git-ignored).
    """
    import cv2

    from kidneyscan.data.datasets import load_image, scan_dataset

    stamp = dst / ".cache.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"src": str(src), "size": size}:
        return dst
    for s in scan_dataset(src):
        img = load_image(s.path)
        small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        out = dst / s.class_name / f"{s.path.stem}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), np.clip(np.rint(small * 255), 0, 255).astype(np.uint8))
    stamp.write_text(json.dumps({"src": str(src), "size": size}))
    return dst


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Federated benchmark: centralized vs FedAvg vs FedProx",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']} (CPU shared with other jobs while it ran: wall times are "
        "indicative; compare within this table).  ",
        f"Model: hybrid {json.dumps(HYBRID_KWARGS)} at {meta['image_size']} px, trained from "
        "scratch; Dirichlet alpha = "
        f"{meta['alpha']} over 3 sites; test split 20 % (leakage-aware); macro-F1 95 % CI by "
        f"bootstrap ({meta['n_boot']} resamples). Local recipe: batch {meta['batch_size']}, "
        "AdamW lr 2e-3 (constant), label smoothing 0.1, augmentation; 15 % of each site held "
        "out for round selection.",
        "",
        "| dataset | run | sites | rounds x local epochs | selected round | test macro-F1 [95 % CI]"
        " | accuracy | MB up / round | MB down / round | rounds wall s | epsilon |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(
            f"| {r['dataset']} | {r['run']} | {r['sites']} | {r['rounds']} x {r['local_epochs']} "
            f"| {r['selected_round']} | {r['macro_f1']:.3f} [{r['macro_f1_ci'][0]:.3f}, "
            f"{r['macro_f1_ci'][1]:.3f}] | {r['accuracy']:.3f} "
            f"| {r['bytes_up_per_round'] / 1e6:.1f} | {r['bytes_down_per_round'] / 1e6:.1f} "
            f"| {r['rounds_seconds']:.0f} | {eps} |"
        )
    lines.append("")
    for ds in sorted({r["dataset"] for r in rows}):
        central = [r for r in rows if r["dataset"] == ds and r["run"] == "centralized"]
        if not central:
            continue
        c = central[0]["macro_f1"]
        gaps = ", ".join(
            f"{r['run']} {100 * (r['macro_f1'] - c):+.1f}"
            for r in rows
            if r["dataset"] == ds and r["run"] != "centralized"
        )
        lines.append(f"- {ds}: macro-F1 points vs centralized: {gaps}.")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run every dataset, write JSON + Markdown."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--phantom-n", type=int, default=400)
    p.add_argument("--real", type=Path, default=REAL)
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-phantom", action="store_true")
    p.add_argument("--no-dp", action="store_true")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (numbers meaningless)")
    p.add_argument("--tag", default="", help="suffix of the result files (federated_TAG.*)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "federated")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.local_epochs, args.phantom_n, args.bootstrap = 2, 1, 96, 100
        args.skip_real = True

    from kidneyscan.data.datasets import scan_dataset
    from kidneyscan.data.phantom import generate_dataset

    rows: list[dict[str, Any]] = []
    common = {
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "alpha": args.alpha,
        "image_size": args.image_size,
        "with_dp": not args.no_dp,
        "n_boot": args.bootstrap,
    }
    if not args.skip_phantom:
        ph = args.out / "phantom_data"
        if not (ph / "kidneyData.csv").is_file():
            generate_dataset(
                ph, args.phantom_n, seed=0, sites=3, image_size=max(64, args.image_size)
            )
        rows += run_dataset("phantom", scan_dataset(ph), args.out, **common)
    if not args.skip_real and (args.real / "kidneyData.csv").is_file():
        real = cached_copy(args.real, args.out / f"ct-kidney-{args.image_size}", args.image_size)
        rows += run_dataset("ct-kidney", scan_dataset(real), args.out, **common)
    meta = {
        "command": "python benchmarks/federated.py "
        + " ".join(a for a in __import__("sys").argv[1:]),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, no GPU",
        "alpha": args.alpha,
        "image_size": args.image_size,
        "n_boot": args.bootstrap,
        "batch_size": BATCH_SIZE,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "federated_quick" if args.quick else "federated"
    if args.tag:
        stem += f"_{args.tag}"
    (args.results / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2, default=float)
    )
    (args.results / f"{stem}.md").write_text(_markdown(rows, meta))
    print(_markdown(rows, meta))


if __name__ == "__main__":
    main()
