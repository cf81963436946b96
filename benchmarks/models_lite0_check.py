"""Are the bundled EfficientNet-Lite0 ImageNet weights loaded right, and with which normalisation?

If the renamed weights sit in the right layers and the input is normalised the way they were
trained, the per-channel statistics of the stem convolution's output on real images line up with
the first BatchNorm's running statistics; random weights give no such agreement. Writes
``benchmarks/results/models_lite0_check.{json,md}``::

    python benchmarks/models_lite0_check.py --data ../shared/data/ct-kidney
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from kidneyscan.data.datasets import load_image, scan_dataset
from kidneyscan.models.factory import IMAGENET_MEAN, IMAGENET_STD, create_classifier
from kidneyscan.preprocess.pipeline import Preprocessor

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/ct-kidney"))
    ap.add_argument("--images", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    samples = scan_dataset(args.data)
    picked = samples[:: max(1, len(samples) // args.images)][: args.images]
    raw = [load_image(s.path) for s in picked]
    rows = []
    for weights in ("efficientnet-lite0", None):
        torch.manual_seed(0)
        model = create_classifier("efficientnet_lite0", 4, weights=weights).eval()
        for norm, mean, std in (
            ("mean=std=0.5", (0.5,) * 3, (0.5,) * 3),
            ("ImageNet mean/std", IMAGENET_MEAN, IMAGENET_STD),
        ):
            prep = Preprocessor(image_size=224, mean=mean, std=std)
            with torch.no_grad():
                y = model.conv_stem(torch.stack([prep(im) for im in raw]))
            batch_mean = y.mean((0, 2, 3)).numpy()
            run_mean = model.bn1.running_mean.numpy()
            r = float(np.corrcoef(batch_mean, run_mean)[0, 1]) if run_mean.std() > 0 else None
            rows.append(
                {
                    "weights": weights or "random init",
                    "normalisation": norm,
                    "corr_stem_mean_vs_bn_running_mean": r,
                }
            )
            print(rows[-1])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "models_lite0_check.json").write_text(json.dumps(rows, indent=2))
    lines = [
        f"Stem-conv output channel means on {len(raw)} real CT slices vs BatchNorm running means.",
        "",
        "| weights | input normalisation | Pearson r |",
        "|---|---|---|",
    ]
    for r in rows:
        v = r["corr_stem_mean_vs_bn_running_mean"]
        shown = "n/a (running means all 0)" if v is None else f"{v:.3f}"
        lines.append(f"| {r['weights']} | {r['normalisation']} | {shown} |")
    (OUT / "models_lite0_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
