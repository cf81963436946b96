"""Training speed of the hybrid with 80 % of its backbone frozen, side by side: a naive loop vs
each optimisation (frozen prefix without autograd, channels-last, bf16 autocast, all three,
cached frozen-prefix features), plus the accuracy effect of cached features on a short run.

Usage::

    python benchmarks/bench_training.py [--size 224] [--steps 3] [--acc-epochs 4]

Part 1 (speed): random-initialised hybrid (convnext_tiny backbone, freeze_fraction 0.8),
batch 16, AdamW; every variant trains its own copy of the same model and the variants take
turns step by step (round-robin) so that load changes on the shared machine hit all alike.
Part 2 (accuracy effect): a small hybrid (convnext_atto, 64 px) trained the same number of
epochs on real images naively (pixel flips) and on cached features (feature flips), then
evaluated on held-out images. Writes ``results/bench_training.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _perf_common import (  # noqa: E402
    REAL_DATA,
    SHARED_NOTE,
    command_line,
    interleaved,
    machine,
    machine_line,
    md_table,
    write_results,
)
from kidneyscan.export.fasttrain import FeatureCache, FrozenSplit, train_epoch_cached  # noqa: E402
from kidneyscan.export.quantize import list_images, preprocess_images  # noqa: E402
from kidneyscan.models.factory import create_classifier  # noqa: E402
from kidneyscan.preprocess.pipeline import Preprocessor  # noqa: E402


def _step_fn(model: nn.Module, *, split: bool, channels_last: bool, bf16: bool) -> Any:
    net: nn.Module = FrozenSplit(model) if split else model
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        model.train()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = net(x)
        else:
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def speed(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    base = create_classifier("hybrid", 4, image_size=args.size, freeze_fraction=0.8)
    variants = {
        "naive": {"split": False, "channels_last": False, "bf16": False},
        "frozen prefix no_grad": {"split": True, "channels_last": False, "bf16": False},
        "channels-last": {"split": False, "channels_last": True, "bf16": False},
        "bf16 autocast": {"split": False, "channels_last": False, "bf16": True},
        "no_grad + channels-last + bf16": {"split": True, "channels_last": True, "bf16": True},
    }
    steps = {k: _step_fn(copy.deepcopy(base), **v) for k, v in variants.items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 4, (args.batch,), generator=gen)
    # Cached features: build the cache once (what the first epoch pays), then steps on it.
    cached_model = copy.deepcopy(base)
    split = FrozenSplit(cached_model)
    t0 = time.process_time()
    cache = FeatureCache(split, [(x, y)])
    cache_build_s = time.process_time() - t0
    opt = torch.optim.AdamW([p for p in cached_model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def cached_step(_x: torch.Tensor, _y: torch.Tensor) -> float:
        return train_epoch_cached(split, cache, opt, loss_fn, batch_size=args.batch)["loss"]

    def cached_bf16_step(_x: torch.Tensor, _y: torch.Tensor) -> float:
        return train_epoch_cached(split, cache, opt, loss_fn, batch_size=args.batch, bf16=True)[
            "loss"
        ]

    steps["cached features (epochs after the first)"] = cached_step
    steps["cached features + bf16 (epochs after the first)"] = cached_bf16_step
    fns = {k: (lambda fn=fn: fn(x, y)) for k, fn in steps.items()}
    times = interleaved(fns, reps=args.steps, warmup=1)
    med = {k: float(np.median(v["cpu"])) for k, v in times.items()}
    print({k: round(v, 2) for k, v in med.items()}, flush=True)
    return {
        "batch": args.batch,
        "size": args.size,
        "frozen_modules": f"{split.n_frozen_modules}/{split.n_modules}",
        "step_cpu_s": med,
        "images_per_cpu_s": {k: args.batch / v for k, v in med.items()},
        "cache_build_s_per_image": cache_build_s / args.batch,
        "cache_bytes_per_image": cache.nbytes / len(cache),
        "raw": times,
    }


def accuracy_effect(args: argparse.Namespace) -> dict[str, Any]:
    files, labels = list_images(REAL_DATA)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))
    # Contiguous index blocks leak patients; a class-balanced random pick is enough for a
    # *comparison* of two training loops on the same split.
    n_tr, n_va = args.acc_train, args.acc_val
    pre = Preprocessor(image_size=64).to_dict()
    xs = torch.from_numpy(preprocess_images([files[i] for i in order[: n_tr + n_va]], pre))
    ys = torch.as_tensor([labels[i] for i in order[: n_tr + n_va]]) if labels else None
    if ys is None:
        raise SystemExit("accuracy effect needs labelled data")
    xtr, ytr, xva, yva = xs[:n_tr], ys[:n_tr], xs[n_tr:], ys[n_tr:]
    from sklearn.metrics import f1_score

    def make() -> nn.Module:
        torch.manual_seed(0)
        kw = {"backbone": "convnext_atto", "embed_dim": 128, "depth": 1, "num_heads": 4}
        return create_classifier("hybrid", 4, image_size=64, freeze_fraction=0.8, **kw)

    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        with torch.inference_mode():
            pred = model(xva).argmax(1).numpy()
        return {
            "accuracy": float((pred == yva.numpy()).mean()),
            "macro_f1": float(f1_score(yva.numpy(), pred, average="macro")),
        }

    out: dict[str, Any] = {"train_images": n_tr, "val_images": n_va, "epochs": args.acc_epochs}
    loss_fn = nn.CrossEntropyLoss()
    # Naive: pixel-space horizontal flips, full forward every epoch.
    model = make()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t0 = time.process_time()
    epoch_s = []
    for ep in range(args.acc_epochs):
        e0 = time.process_time()
        model.train()
        g = torch.Generator().manual_seed(ep)
        perm = torch.randperm(n_tr, generator=g)
        for i in range(0, n_tr, 16):
            j = perm[i : i + 16]
            xb = xtr[j].clone()
            flip = torch.rand(len(j), generator=g) < 0.5
            xb[flip] = xb[flip].flip(-1)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), ytr[j]).backward()
            opt.step()
        epoch_s.append(time.process_time() - e0)
    out["naive"] = {**evaluate(model), "epoch_s": epoch_s, "total_s": time.process_time() - t0}
    # Cached: features once, feature-space flips.
    model = make()
    split = FrozenSplit(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t0 = time.process_time()
    cache = FeatureCache(split, [(xtr[i : i + 16], ytr[i : i + 16]) for i in range(0, n_tr, 16)])
    build = time.process_time() - t0
    epoch_s = []
    for ep in range(args.acc_epochs):
        e0 = time.process_time()
        train_epoch_cached(split, cache, opt, loss_fn, batch_size=16, seed=ep, flip_p=0.5)
        epoch_s.append(time.process_time() - e0)
    epoch_s[0] += build
    out["cached"] = {**evaluate(model), "epoch_s": epoch_s, "total_s": time.process_time() - t0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--acc-epochs", type=int, default=4)
    ap.add_argument("--acc-train", type=int, default=192)
    ap.add_argument("--acc-val", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    sp = speed(args)
    acc = accuracy_effect(args) if REAL_DATA.is_dir() and args.acc_epochs > 0 else None
    info["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    base = sp["images_per_cpu_s"]["naive"]
    rows = [[k, f"{v:.2f}", f"{sp['step_cpu_s'][k]:.2f}", f"{v / base:.2f}x"]
            for k, v in sp["images_per_cpu_s"].items()]  # fmt: skip
    lines = [
        "### Training (CPU, hybrid convnext_tiny, 80 % of the backbone frozen)",
        "",
        f"Command: `{command_line()}` (batch {args.batch}, {args.size} px, AdamW; "
        f"frozen prefix = {sp['frozen_modules']} backbone modules).",
        "",
        machine_line(info) + f" Load average at end {info['load_average_end']}.",
        "",
        md_table(["variant", "images/CPU-s", "median step CPU s", "vs naive"], rows),
        "",
        f"Cached features cost {sp['cache_build_s_per_image'] * 1000:.0f} ms per image once "
        f"(the first epoch) and {sp['cache_bytes_per_image'] / 1024:.0f} KiB of memory per image"
        " (fp32).",
    ]
    if acc is not None:
        n, c = acc["naive"], acc["cached"]
        later_n = float(np.mean(n["epoch_s"][1:])) if len(n["epoch_s"]) > 1 else n["epoch_s"][0]
        later_c = float(np.mean(c["epoch_s"][1:])) if len(c["epoch_s"]) > 1 else c["epoch_s"][0]
        lines += [
            "",
            f"Accuracy effect of cached features (hybrid convnext_atto, 64 px, freeze 0.8, "
            f"{acc['epochs']} epochs, {acc['train_images']} real training images, "
            f"{acc['val_images']} held-out; random-initialised backbone):",
            "",
            md_table(
                ["loop", "val accuracy", "val macro-F1", "epoch 1 CPU s", "later epochs CPU s"],
                [
                    [
                        "naive (pixel flips)",
                        f"{n['accuracy']:.3f}",
                        f"{n['macro_f1']:.3f}",
                        f"{n['epoch_s'][0]:.2f}",
                        f"{later_n:.2f}",
                    ],
                    [
                        "cached features (feature flips)",
                        f"{c['accuracy']:.3f}",
                        f"{c['macro_f1']:.3f}",
                        f"{c['epoch_s'][0]:.2f}",
                        f"{later_c:.2f}",
                    ],
                ],
            ),  # fmt: skip
            "",
            f"Per-epoch speed-up after the first: {later_n / later_c:.1f}x.",
        ]
    lines += ["", SHARED_NOTE]
    payload = {"machine": info, "speed": sp, "accuracy_effect": acc, "args": vars(args)}
    write_results("bench_training", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
