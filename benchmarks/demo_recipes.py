"""Benchmark: head recipes for ``make demo``, FedAvg in one process on the demo's cached features.

Why: a ``kidneyscan demo`` run takes about 13 minutes here, most of it in the rounds, so
trying a recipe through Flower and Ray costs a quarter of an hour. This replays the demo's
FedAvg without them, on the run folder and feature cache a demo run left behind: every round
each hospital gets the global trainable tensors, trains through
:func:`kidneyscan.federated.task.train_local` (the client's own path: cached features, one
epoch loop), and the tensors are averaged by image count; after each round the global model
is scored on the hospitals' hold-outs and on the unseen test patients. It prints one line per
round (mean local loss, hold-out and test macro-F1, per-class test recall, seconds so far)
and writes nothing else.

``--pooled-bn`` puts a BatchNorm1d between the pooled embedding and the head (its running
statistics averaged like the weights): a diagnostic of why the first rounds stay at chance,
not a model option.

Usage (after ``KIDNEYSCAN_CACHE=DIR kidneyscan demo --out RUN``)::

    KIDNEYSCAN_CACHE=DIR python benchmarks/demo_recipes.py --run RUN --rounds 8
    KIDNEYSCAN_CACHE=DIR python benchmarks/demo_recipes.py --run RUN --optimizer-state keep
    KIDNEYSCAN_CACHE=DIR python benchmarks/demo_recipes.py --run RUN --central --lr-schedule cosine
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kidneyscan.data.partition import load_partition
from kidneyscan.federated import task


def _config(args: argparse.Namespace) -> dict[str, Any]:
    raw = json.loads((args.run / "run_config.json").read_text())
    kwargs = {**json.loads(raw["model-kwargs"]), **json.loads(args.model_kwargs)}
    raw.update(
        {
            "num-server-rounds": args.rounds,
            "local-epochs": args.local_epochs,
            "lr": args.lr if args.lr is not None else raw["lr"],
            "batch-size": args.batch if args.batch is not None else raw["batch-size"],
            "lr-schedule": args.lr_schedule,
            "optimizer-state": args.optimizer_state,
            "model-kwargs": json.dumps(kwargs),
        }
    )
    return task.run_config(raw)


def _recall(probs: np.ndarray, labels: np.ndarray) -> list[float]:
    pred = probs.argmax(1)
    return [round(float((pred[labels == c] == c).mean()), 2) for c in range(probs.shape[1])]


def main(argv: list[str] | None = None) -> int:
    """Replay the demo's FedAvg with the given recipe; print one line per round."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished demo's --out folder")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=None, help="default: the run's")
    ap.add_argument("--batch", type=int, default=None, help="default: the run's")
    ap.add_argument("--lr-schedule", choices=task.LR_SCHEDULES, default="constant")
    ap.add_argument("--optimizer-state", choices=task.OPTIMIZER_STATES, default="fresh")
    ap.add_argument("--model-kwargs", default="{}", help="JSON, e.g. '{\"token_drop\": 0.5}'")
    ap.add_argument("--central", action="store_true", help="one site holding every hospital")
    ap.add_argument("--pooled-bn", action="store_true", help="diagnostic, see the docstring")
    args = ap.parse_args(argv)
    if not (args.run / "run_config.json").is_file():
        ap.error(f"{args.run} has no run_config.json: run `kidneyscan demo --out {args.run}`")
    cfg = _config(args)
    model = task.build_model(cfg)
    norm: nn.BatchNorm1d | None = None
    if args.pooled_bn:
        norm = nn.BatchNorm1d(model.embed_dim)
        model.head = nn.Sequential(norm, model.head)
    sites = [
        task.split_local(p, float(cfg["local-val-fraction"]), int(cfg["seed"]))
        for p in load_partition(str(cfg["partition-file"]))
    ]
    if args.central:
        sites = [(sum((s[0] for s in sites), []), sum((s[1] for s in sites), []))]
        cfg["batch-size"] = args.batch or 32
    val = sum((s[1] for s in sites), [])
    test = load_partition(str(cfg["test-file"]))[0]
    weights = task.get_trainable(model)
    stats_global: list[torch.Tensor] | None = None
    states: list[Any] = [None] * len(sites)
    t0 = time.time()
    for rnd in range(1, args.rounds + 1):
        new, sizes, losses, stats = [], [], [], []
        for i, (train, _) in enumerate(sites):
            task.set_trainable(model, weights)
            if norm is not None and stats_global is not None:
                norm.running_mean.copy_(stats_global[0])
                norm.running_var.copy_(stats_global[1])
            res = task.train_local(model, train, cfg, server_round=rnd, optimizer_state=states[i])
            states[i] = res.get("optimizer-state")
            new.append(task.get_trainable(model))
            sizes.append(len(train))
            losses.append(res["loss"])
            if norm is not None:
                stats.append((norm.running_mean.clone(), norm.running_var.clone()))
        share = np.asarray(sizes, dtype=np.float64) / sum(sizes)
        weights = [
            sum(w * arrays[k] for w, arrays in zip(share, new, strict=True)).astype(np.float32)
            for k in range(len(weights))
        ]
        task.set_trainable(model, weights)
        if norm is not None:
            stats_global = [
                sum(float(w) * s[j] for w, s in zip(share, stats, strict=True)) for j in range(2)
            ]
            norm.running_mean.copy_(stats_global[0])
            norm.running_var.copy_(stats_global[1])
        held, _, _ = task.evaluate_model(model, val, cfg)
        scored, probs, labels = task.evaluate_model(model, test, cfg)
        print(
            f"round {rnd} | loss {np.mean(losses):.3f} | hold-out macro-F1 {held['macro-f1']:.3f}"
            f" | test macro-F1 {scored['macro-f1']:.3f} | test recall {_recall(probs, labels)}"
            f" | {time.time() - t0:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
