"""Does preprocessing help the classifier? Same model, same split, with and without DIP steps.

For each dataset (phantom hospitals with per-site noise, and the real CT-KIDNEY sample) the
script makes one leakage-aware split (:func:`kidneyscan.data.splits.make_split`: patient
groups on the phantom, index blocks + perceptual-hash clusters on CT-KIDNEY), then trains the
same small CNN from scratch with the engine's recipe once per pipeline arm and reports test
macro-F1 with a bootstrap 95 % CI. Preprocessed images are computed once per arm and cached
in memory, so slow steps (NLM) cost one pass, not one per epoch.

Writes ``benchmarks/results/preprocess_classifier.{json,md}``.

Usage::

    python benchmarks/preprocess_classifier.py [--phantom-n 320] [--image-size 128]
        [--epochs 8] [--real PATH] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kidneyscan.config import TrainConfig
from kidneyscan.data.datasets import CLASSES, Sample, load_image, scan_dataset
from kidneyscan.data.splits import make_split
from kidneyscan.engine import fit, predict, set_seed
from kidneyscan.evaluation.metrics import bootstrap_ci, macro_f1
from kidneyscan.models.factory import create_classifier
from kidneyscan.preprocess.pipeline import Preprocessor

#: Bilateral filtering had the best SSIM on the noisy phantom in ``preprocess bench`` (tied
#: with NLM + stretch) and is ~30x cheaper than NLM on 512 px slices; ``crop_body`` removes air
#: and the scanner table (a 1.2-1.5x zoom) so small stones keep more pixels.
ARMS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "bilateral": [{"name": "smooth_bilateral", "sigma_color": 0.1}],
    "crop_body + bilateral": [
        {"name": "crop_body"},
        {"name": "smooth_bilateral", "sigma_color": 0.1},
    ],
}


class CachedSet(Dataset[tuple[torch.Tensor, int]]):
    """Preprocessed tensors of a list of samples, computed once."""

    def __init__(self, samples: list[Sample], pre: Preprocessor) -> None:
        self.x = torch.stack([pre(load_image(s.path)) for s in samples])
        self.labels = np.array([s.label for s in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.labels[i])


def run_arm(
    split: dict[str, list[Sample]], steps: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """Train and test one pipeline arm; returns macro-F1, its CI and timings."""
    pre = Preprocessor(
        steps=steps, image_size=args.image_size, in_chans=1, mean=(0.5,), std=(0.25,)
    )
    t0 = time.perf_counter()
    sets = {k: CachedSet(v, pre) for k, v in split.items()}
    prep_s = time.perf_counter() - t0
    set_seed(args.seed)
    loaders = {
        k: DataLoader(
            ds,
            batch_size=32,
            shuffle=(k == "train"),
            generator=torch.Generator().manual_seed(args.seed),
        )
        for k, ds in sets.items()
    }
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=32, lr=2e-3, augment=False, seed=args.seed,
        early_stopping_patience=0, warmup_epochs=1.0,
    )  # fmt: skip
    model = create_classifier("small_cnn", len(CLASSES), in_chans=1)
    t0 = time.perf_counter()
    fit(model, loaders["train"], loaders["val"], cfg, classes=CLASSES, progress=False)
    train_s = time.perf_counter() - t0
    logits, labels = predict(model, loaders["test"])
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    lo, hi = bootstrap_ci(labels, probs, macro_f1, n=1000, seed=args.seed)
    return {
        "macro_f1": macro_f1(labels, probs),
        "ci95": [lo, hi],
        "n_test": int(len(labels)),
        "preprocess_s": prep_s,
        "train_s": train_s,
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phantom-n", type=int, default=320, help="phantom images (0 = skip)")
    ap.add_argument("--phantom-sites", type=int, default=3, help="phantom hospitals")
    ap.add_argument("--image-size", type=int, default=128, help="model input side (px)")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs per arm")
    ap.add_argument("--seed", type=int, default=0, help="seed of data, split and training")
    ap.add_argument("--real", type=Path, default=Path("../shared/data/ct-kidney"),
                    help="CT-KIDNEY folder (skipped when absent)")  # fmt: skip
    ap.add_argument("--real-n", type=int, default=0,
                    help="random class-stratified subset of the real data (0 = all)")  # fmt: skip
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output dir")
    args = ap.parse_args()
    torch.set_num_threads(2)
    arms = {k: ARMS[k] for k in args.arms.split(",")}
    datasets: dict[str, Path] = {}
    tmp = tempfile.TemporaryDirectory()
    if args.phantom_n > 0:
        from kidneyscan.data.phantom import generate_dataset

        root = Path(tmp.name) / "phantom"
        generate_dataset(root, n=args.phantom_n, seed=args.seed, sites=args.phantom_sites,
                         image_size=256)  # fmt: skip
        datasets["phantom"] = root
    if (args.real / "kidneyData.csv").is_file():
        datasets["ct-kidney"] = args.real
    else:
        print(f"real data not found at {args.real} (no kidneyData.csv): skipped", flush=True)
    if not datasets:
        raise SystemExit("nothing to run: --phantom-n 0 and no real data")
    results: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}}
    for name, root in datasets.items():
        samples = scan_dataset(root)
        if name == "ct-kidney" and 0 < args.real_n < len(samples):
            # Same share of every class; the split below still groups neighbours / near-dups.
            rng = np.random.default_rng(args.seed)
            keep = []
            for c in range(len(CLASSES)):
                idx = [i for i, s in enumerate(samples) if s.label == c]
                k = round(args.real_n * len(idx) / len(samples))
                keep += list(rng.choice(idx, size=min(k, len(idx)), replace=False))
            samples = [samples[i] for i in sorted(keep)]
        split = make_split(samples, val=0.15, test=0.2, seed=args.seed)
        parts = {k: list(split[k]) for k in ("train", "val", "test")}
        results[name] = {"sizes": {k: len(v) for k, v in parts.items()}, "arms": {}}
        for arm, steps in arms.items():
            r = run_arm(parts, steps, args)
            results[name]["arms"][arm] = r
            print(f"{name:10s} {arm:16s} macro-F1 {r['macro_f1']:.3f} "
                  f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  prep {r['preprocess_s']:.0f}s "
                  f"train {r['train_s']:.0f}s", flush=True)  # fmt: skip
    tmp.cleanup()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocess_classifier.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"small_cnn from scratch, {args.image_size} px, 1 channel, {args.epochs} epochs, no "
        "augmentation, same seed and split per dataset; test macro-F1 with bootstrap 95% CI "
        "(1000 resamples).",
        "",
        "| dataset (train/val/test) | pipeline | test macro-F1 | 95% CI | preprocess s | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name in datasets:
        sz = results[name]["sizes"]
        for arm, r in results[name]["arms"].items():
            lines.append(
                f"| {name} ({sz['train']}/{sz['val']}/{sz['test']}) | {arm} | "
                f"{r['macro_f1']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | "
                f"{r['preprocess_s']:.0f} | {r['train_s']:.0f} |"
            )
    (args.out / "preprocess_classifier.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
