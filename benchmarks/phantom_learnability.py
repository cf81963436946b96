"""Is the phantom task learnable? A tiny CNN, patient-grouped split, per-class test recall.

Complements ``phantom_shortcuts.py`` (trivial features at chance): a small convolutional
network trained for a few epochs on CPU should beat chance clearly if the lesions are visible,
and stay below 100 % if the confounders do their job. Writes
``benchmarks/results/phantom_learnability.{json,md}``::

    python benchmarks/phantom_learnability.py [--n 1200] [--image-size 128] [--epochs 12]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import GroupShuffleSplit
from torch import nn

from kidneyscan.data.datasets import CLASSES, load_image, scan_dataset
from kidneyscan.data.phantom import generate_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def tiny_cnn(num_classes: int = 4) -> nn.Module:
    """Four conv blocks + global pooling: ~100 k parameters."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        block(1, 16),
        block(16, 32),
        block(32, 48),
        block(48, 64),
        nn.AdaptiveMaxPool2d(1),  # lesions are small: max, not mean, over positions
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, args.n, seed=0, sites=3, image_size=args.image_size)
        samples = scan_dataset(Path(tmp))
        x = np.stack([load_image(s.path) for s in samples])[:, None]
    y = np.array([s.label for s in samples])
    groups = np.array([f"{s.class_name}/{s.patient_id}" for s in samples])
    train, test = next(GroupShuffleSplit(1, test_size=0.25, random_state=0).split(x, y, groups))
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    xv, yv = torch.from_numpy(x[test]), torch.from_numpy(y[test])
    model = tiny_cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=args.epochs * ((len(train) + 31) // 32)
    )
    history = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train))
        for i in range(0, len(train), 32):
            idx = perm[i : i + 32]
            xb = xt[idx]
            if torch.rand(()) < 0.5:  # left-right flip: both kidneys carry lesions
                xb = xb.flip(-1)
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xv[i : i + 64]).argmax(1) for i in range(0, len(xv), 64)])
        acc = float((pred == yv).float().mean())
        history.append(round(acc, 3))
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} test acc {acc:.3f}", flush=True)
    recall = {
        c: round(float((pred[yv == k] == k).float().mean()), 3) for k, c in enumerate(CLASSES)
    }
    result = {
        "command": f"python benchmarks/phantom_learnability.py --n {args.n} "
        f"--image-size {args.image_size} --epochs {args.epochs}",
        "train_images": int(len(train)),
        "test_images": int(len(test)),
        "split": "patient-grouped (GroupShuffleSplit 75/25), 3 sites",
        "test_accuracy": history[-1],
        "test_accuracy_per_epoch": history,
        "test_recall": recall,
        "chance": 0.25,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "phantom_learnability.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Phantom learnability: tiny CNN (~100 k parameters), CPU",
        "",
        f"Command: `{result['command']}`  ",
        f"{result['train_images']} train / {result['test_images']} test images, "
        f"{result['split']}; {result['wall_s']} s wall on a shared 2-core machine.",
        "",
        "| test accuracy | " + " | ".join(f"recall {c}" for c in CLASSES) + " |",
        "|---:|" + "---:|" * len(CLASSES),
        f"| {result['test_accuracy']} | " + " | ".join(str(recall[c]) for c in CLASSES) + " |",
        "",
        f"Accuracy per epoch: {', '.join(map(str, history))} (chance 0.25).",
        "",
    ]
    (RESULTS / "phantom_learnability.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
