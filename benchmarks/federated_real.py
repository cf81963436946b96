"""Federated vs central training of the default CT-backbone hybrid on the real sample.

Three hospitals hold contiguous index bands of the training pool (``bands`` partitioning: by
patient, as far as the data allows without patient IDs); the server's test set is a band none of
them saw (the leakage-aware band split of ``kidneyscan.federated.simulation.split_test``).
Every run goes through the product's federated path (Flower simulation, ``cache-features``: each
hospital reads its frozen ResNet-152 features from the on-disk cache, computed once) with the
same budget: ``rounds x local_epochs`` passes over every training image. "Centralized" is one
site holding the whole pool, on the same schedule. Rounds are selected on the sites' own
validation hold-outs, never on the test band. Each configuration runs with several training
seeds (model initialisation, shuffling, local hold-outs); the data split stays fixed.

DP rows: FedAvg with Flower's server-side fixed clipping (``server-fixed``) and the Gaussian
noise multiplier that gives the target epsilon (delta 1e-5) after the run's rounds, from the
project's RDP accountant (:func:`kidneyscan.federated.privacy.noise_for_epsilon`).

Writes ``benchmarks/results/federated_ct.{json,md}``::

    python benchmarks/federated_real.py [--rounds 6] [--local-epochs 1] [--seeds 0 1 2]
        [--site-batch-size 11] [--runs centralized,fedavg,fedprox] [--epsilons 1 3 10]

``--runs`` takes any of ``RUNS`` (also ``fedadam``, ``fedavgm``, ``fedavgm05``,
``centralized_cosine``, ``fedavg_cosine``, ``centralized_keep``, ``fedavg_keep``); the default
is the README table's rows.

The budget is the same for every run: ``rounds x local_epochs`` passes over every image and,
with the 3 sites at batch 11 (the central batch 32 / 3), the same number of optimiser steps
per epoch at every site as in the central run. The first recipe (3 rounds x 2 epochs, batch
32 at every site) gave the sites a third of the central run's steps and left FedAvg
under-trained (train loss 1.0 vs 0.54 after 3 rounds; test macro-F1 0.275 vs 0.782).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federated import REAL  # noqa: E402
from kidneyscan.data.datasets import CLASSES, scan_dataset  # noqa: E402
from kidneyscan.evaluation.metrics import bootstrap_ci, macro_f1  # noqa: E402
from kidneyscan.federated import task  # noqa: E402
from kidneyscan.federated.privacy import noise_for_epsilon  # noqa: E402
from kidneyscan.federated.simulation import prepare_run, simulate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: The default recipe's model and input (as ``kidneyscan train`` with no options).
BASE = {
    "model": "hybrid",
    "model-kwargs": "{}",
    "image-size": 224,
    "preprocessing": json.dumps([{"name": "crop_kidney_band"}]),
    "cache-features": True,
    "batch-size": 32,
    "lr": 3e-4,  # the central recipe's peak rate (constant here: no state travels)
    "local-val-fraction": 0.15,
}
#: run name -> (sites, run-config overrides)
RUNS: dict[str, tuple[int, dict[str, Any]]] = {
    "centralized": (1, {"strategy": "fedavg"}),
    "fedavg": (3, {"strategy": "fedavg"}),
    "fedprox": (3, {"strategy": "fedprox", "proximal-mu": 0.01}),
    "fedadam": (3, {"strategy": "fedadam", "server-lr": 0.01, "server-tau": 0.001}),
    "fedavgm": (3, {"strategy": "fedavgm", "server-momentum": 0.9, "fedavgm-server-lr": 1.0}),
    "fedavgm05": (3, {"strategy": "fedavgm", "server-momentum": 0.5, "fedavgm-server-lr": 1.0}),
    # The central recipe's schedule (1 epoch of warm-up, cosine decay) across the rounds.
    "centralized_cosine": (1, {"strategy": "fedavg", "lr-schedule": "cosine"}),
    "fedavg_cosine": (3, {"strategy": "fedavg", "lr-schedule": "cosine"}),
    # Each site keeps its AdamW moments and step count between rounds (never sent).
    "centralized_keep": (1, {"strategy": "fedavg", "optimizer-state": "keep"}),
    "fedavg_keep": (3, {"strategy": "fedavg", "optimizer-state": "keep"}),
}
#: Run-name suffixes that change the local optimiser; such a row is compared with the one-site
#: run of the same suffix (``fedavg_keep`` with ``centralized_keep``).
OPTIMIZER_VARIANTS = ("_cosine", "_keep")
LABELS = {
    "centralized": "centralized (1 site, whole pool)",
    "fedavg": "FedAvg",
    "fedprox": "FedProx (mu = 0.01)",
    "fedadam": "FedAdam (server lr 0.01)",
    "fedavgm": "FedAvgM (server momentum 0.9, server lr 1)",
    "fedavgm05": "FedAvgM (server momentum 0.5, server lr 1)",
    "centralized_cosine": "centralized, warm-up + cosine learning rate over the rounds",
    "fedavg_cosine": "FedAvg, warm-up + cosine learning rate over the rounds",
    "centralized_keep": "centralized, AdamW state kept between rounds",
    "fedavg_keep": "FedAvg, each site keeps its AdamW state between rounds",
}
DP_CLIP = 5.0


def one_run(
    name: str, samples: list[Any], out: Path, cfg_over: dict[str, Any], sites: int, seed: int
) -> dict[str, Any]:
    """One federated (or one-site) run; returns its test metrics, bytes and times."""
    batch = int(cfg_over.get("batch-size", BASE["batch-size"]))
    # Runs at the base batch keep their old folder names (their cached results stay valid).
    tag = "" if batch == BASE["batch-size"] else f"_b{batch}"
    schedule = (int(cfg_over["num-server-rounds"]), int(cfg_over["local-epochs"]))
    tag += "" if schedule == (3, 2) else f"_r{schedule[0]}x{schedule[1]}"
    run_dir = out / f"{name}{tag}_s{seed}"
    done = run_dir / "result.json"
    if done.is_file():  # finished earlier (same command): reuse, so runs can be added later
        cached: dict[str, Any] = json.loads(done.read_text())
        return cached
    prepared = prepare_run(
        samples,
        run_dir,
        num_clients=sites,
        partitioning="bands",
        min_samples=10,
        test_fraction=0.2,
        local_val_fraction=0.15,
        seed=0,  # the data split and partitions are the same for every run and seed
    )
    cfg = {
        **BASE,
        **cfg_over,
        "min-clients": sites,
        "num-clients": sites,
        "seed": seed,
        "out-dir": str(run_dir),
        "partition-file": prepared["partition-file"],
        "test-file": prepared["test-file"],
        "split-file": prepared["split-file"],
    }
    t0 = time.perf_counter()
    # one site gets both cores; three run two at a time, one core each
    summary = simulate(cfg, num_clients=sites, cpus_per_client=2.0 if sites == 1 else 1.0)
    total = time.perf_counter() - t0
    from kidneyscan.data.partition import load_partition
    from kidneyscan.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(run_dir / "checkpoint")
    test = load_partition(run_dir / "test.csv")[0]
    scalars, probs, labels = task.evaluate_model(model, test, task.run_config(cfg))
    history = json.loads((run_dir / "curves.json").read_text())
    eps = [r["dp-epsilon"] for r in history if "dp-epsilon" in r]
    result = {
        "run": name,
        "seed": seed,
        "sites": sites,
        "rounds": summary["completed_round"],
        "local_epochs": int(cfg["local-epochs"]),
        "selected_round": meta["training"]["round"],
        "batch_size": batch,
        "macro_f1": scalars["macro-f1"],
        "accuracy": scalars["accuracy"],
        "n_test": len(test),
        "bytes_up_per_round": float(np.mean(summary["bytes_up_per_round"])),
        "bytes_down_per_round": float(np.mean(summary["bytes_down_per_round"])),
        "rounds_seconds": summary["wall_seconds"],
        "total_seconds": total,
        "epsilon": eps[-1] if eps else None,
        "noise_multiplier": cfg.get("dp-noise-multiplier")
        if cfg.get("dp", "none") != "none"
        else None,
        "partition": [p["per_class"] for p in prepared["summary"]],
        "labels": labels.tolist(),
        "probs": probs.tolist(),
    }
    done.write_text(json.dumps(result, default=float))
    return result


def _seed_mean(runs: list[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    """Mean ± SD over seeds, and a bootstrap CI (over test images) of the seed-mean macro-F1."""
    labels = np.asarray(runs[0]["labels"])
    stacked = np.concatenate([np.asarray(r["probs"]) for r in runs], axis=1)
    k = len(CLASSES)

    def mean_f1(y: np.ndarray, p: np.ndarray) -> float:
        return float(np.mean([macro_f1(y, p[:, i * k : (i + 1) * k]) for i in range(len(runs))]))

    lo, hi = bootstrap_ci(labels, stacked, mean_f1, n=n_boot, seed=0)
    f1 = [r["macro_f1"] for r in runs]
    return {"mean": float(np.mean(f1)), "sd": float(np.std(f1, ddof=1)) if len(f1) > 1 else 0.0,
            "ci95": [float(lo), float(hi)], "per_seed": f1}  # fmt: skip


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]], n_boot: int) -> list[float]:
    """Bootstrap CI of mean macro-F1(a) - mean macro-F1(b) over the same resampled images."""
    labels = np.asarray(a[0]["labels"])
    k = len(CLASSES)
    stacked = np.concatenate([np.asarray(r["probs"]) for r in a + b], axis=1)

    def diff(y: np.ndarray, p: np.ndarray) -> float:
        f = [macro_f1(y, p[:, i * k : (i + 1) * k]) for i in range(len(a) + len(b))]
        return float(np.mean(f[: len(a)]) - np.mean(f[len(a) :]))

    lo, hi = bootstrap_ci(labels, stacked, diff, n=n_boot, seed=1)
    return [float(lo), float(hi)]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The README table: one line per configuration, seeds pooled."""
    lines = [
        "# Federated vs central on the real sample (default CT-backbone hybrid)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['note']}  ",
        f"Data: {meta['n_pool']} training images in 3 hospitals by contiguous index bands "
        f"({meta['sites']}), test band of {meta['n_test']} images none of them saw; "
        f"{meta['rounds']} rounds x {meta['local_epochs']} local epochs (centralized: one site, "
        f"same schedule, batch {BASE['batch-size']}; each of the 3 sites: batch "
        f"{meta['site_batch_size']}, so every site takes as many optimiser steps per epoch as "
        "the central run); features from the on-disk cache (frozen ResNet-152, kidney band "
        "224 x 336); rounds selected on the sites' validation hold-outs. Seeds "
        f"{meta['seeds']}: macro-F1 mean ± SD over seeds, 95 % CI of the seed mean by "
        f"bootstrap over test images ({meta['n_boot']} resamples).",
        "",
        "| run | seeds | test macro-F1 mean ± SD | 95 % CI | vs centralized, same optimiser "
        "[95 % CI] "
        "| accuracy | MB up / round | MB down / round | wall s / run | epsilon (delta 1e-5) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = r.get("vs_central")
        gap_s = (
            "-"
            if gap is None
            else "{:+.1f} [{:+.1f}, {:+.1f}]".format(
                *(100 * v for v in (gap["mean"], *gap["ci95"]))
            )
        )
        eps = (
            "-"
            if r["epsilon"] is None
            else f"{r['epsilon']:.2f} (sigma {r['noise_multiplier']:.2f})"
        )
        lines.append(
            f"| {r['label']} | {len(r['seeds'])} | {r['f1']['mean']:.3f} ± {r['f1']['sd']:.3f} "
            f"| [{r['f1']['ci95'][0]:.2f}, {r['f1']['ci95'][1]:.2f}] | {gap_s} "
            f"| {r['accuracy']:.3f} | {r['mb_up']:.1f} | {r['mb_down']:.1f} | {r['wall_s']:.0f} "
            f"| {eps} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REAL)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--runs",
        default="centralized,fedavg,fedprox",
        help=f"comma-separated, of: {','.join(RUNS)} (default: the README table's rows)",
    )
    ap.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 10.0])
    ap.add_argument("--dp-seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--site-batch-size",
        type=int,
        default=11,
        help="batch size of the 3-site runs (default 11: central batch 32 / 3 sites, so every "
        "site takes as many optimiser steps per epoch as the central run)",
    )
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--note", default="2 cores, nothing else running")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "federated_real")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (args.data / "kidneyData.csv").is_file() and not (args.data / "Cyst").is_dir():
        raise SystemExit(f"no real sample at {args.data}; pass --data")
    samples = scan_dataset(args.data)
    common = {"num-server-rounds": args.rounds, "local-epochs": args.local_epochs}
    plan: list[tuple[str, str, int, dict[str, Any], list[int]]] = []
    unknown = [n for n in args.runs.split(",") if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown --runs {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    for name in args.runs.split(","):
        sites, over = RUNS[name]
        site_batch = {"batch-size": args.site_batch_size} if sites > 1 else {}
        plan.append((name, LABELS[name], sites, {**common, **site_batch, **over}, args.seeds))
    for eps in args.epsilons:
        z = noise_for_epsilon(eps, rounds=args.rounds, sampling_rate=1.0, delta=1e-5)
        over = {**common, "batch-size": args.site_batch_size, "strategy": "fedavg",
                "dp": "server-fixed", "dp-noise-multiplier": z, "dp-clipping-norm": DP_CLIP,
                "dp-delta": 1e-5}  # fmt: skip
        plan.append((f"dp_eps{eps:g}", f"FedAvg + DP, epsilon {eps:g} (server-side clipping "
                     f"{DP_CLIP:g} + noise)", 3, over, args.dp_seeds))  # fmt: skip
    # Seed by seed, so that a stopped run still has complete pairs to compare.
    order = sorted(
        ((seed, i) for i, (*_, seeds) in enumerate(plan) for seed in seeds),
        key=lambda t: (t[0], t[1]),
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed, i in order:
        name, label, sites, over, _ = plan[i]
        print(f"== {label}, seed {seed}", flush=True)
        r = one_run(name, samples, args.out, over, sites, seed)
        print(f"   macro-F1 {r['macro_f1']:.3f}  ({r['total_seconds']:.0f} s)", flush=True)
        runs.setdefault(name, []).append({**r, "label": label})
    runs = {name: runs[name] for name, *_ in plan if name in runs}
    rows = []
    for name, rs in runs.items():
        row = {
            "run": name,
            "label": rs[0]["label"],
            "seeds": [r["seed"] for r in rs],
            "f1": _seed_mean(rs, args.bootstrap),
            "accuracy": float(np.mean([r["accuracy"] for r in rs])),
            "mb_up": float(np.mean([r["bytes_up_per_round"] for r in rs])) / 1e6,
            "mb_down": float(np.mean([r["bytes_down_per_round"] for r in rs])) / 1e6,
            "wall_s": float(np.mean([r["total_seconds"] for r in rs])),
            "epsilon": rs[0]["epsilon"],
            "noise_multiplier": rs[0]["noise_multiplier"],
            "selected_rounds": [r["selected_round"] for r in rs],
        }
        # Against the one-site run with the same local optimiser (none: no gap column).
        variant = next((v for v in OPTIMIZER_VARIANTS if name.endswith(v)), "")
        central = runs.get("centralized" + variant)
        if central and not name.startswith("centralized"):
            shared = [s for s in row["seeds"] if s in {c["seed"] for c in central}]
            a = [r for r in rs if r["seed"] in shared]
            b = [c for c in central if c["seed"] in shared]
            if a:
                row["vs_central"] = {
                    "mean": float(
                        np.mean([r["macro_f1"] for r in a]) - np.mean([c["macro_f1"] for c in b])
                    ),
                    "ci95": _paired(a, b, args.bootstrap),
                    "seeds": shared,
                }  # fmt: skip
        rows.append(row)
    first = next(iter(runs.values()))[0]
    meta = {
        "command": "python benchmarks/federated_real.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, 2 CPU cores, no GPU",
        "note": args.note,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "site_batch_size": args.site_batch_size,
        "seeds": args.seeds,
        "n_boot": args.bootstrap,
        "n_test": first["n_test"],
        "n_pool": len(samples) - first["n_test"],
        "sites": "; ".join(
            f"site {i}: " + ", ".join(f"{c} {n}" for c, n in part.items())
            for i, part in enumerate(runs.get("fedavg", [first])[0]["partition"])
        ),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    slim = {n: [{k: v for k, v in r.items() if k not in ("labels", "probs")} for r in rs]
            for n, rs in runs.items()}  # fmt: skip
    (args.results / "federated_ct.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "runs": slim}, indent=2, default=float)
    )
    md = markdown(rows, meta)
    (args.results / "federated_ct.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
