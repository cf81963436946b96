"""Parameter counts of every factory model at 224 px (299 px for Inception-v3).

Writes ``benchmarks/results/model_sizes.json`` and ``.md``. Counts are exact (no timing), so the
shared CPU does not matter. Usage::

    python benchmarks/model_sizes.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from kidneyscan.models.factory import create_classifier, default_cfg, trainable_state_keys

OUT = Path(__file__).resolve().parent / "results"

MODELS: list[tuple[str, dict]] = [
    ("hybrid", {"image_size": 224}),
    ("hybrid", {"image_size": 224, "backbone": "convnext_atto", "embed_dim": 256, "depth": 2}),
    ("hybrid", {"image_size": 224, "backbone": "tf_efficientnet_lite0", "embed_dim": 256}),
    ("small_cnn", {}),
    ("resnet50", {}),
    ("vgg19", {}),
    ("mobilenetv2", {}),
    ("densenet169", {}),
    ("googlenet", {}),
    ("inception_v3", {}),
    ("vit_b16", {}),
    ("swin_t", {}),
    ("efficientnet_lite0", {}),
]


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, kwargs in MODELS:
        t0 = time.perf_counter()
        model = create_classifier(name, 4, **kwargs).eval()
        size = default_cfg(name, **kwargs)["image_size"]
        with torch.no_grad():
            emb = model.forward_head(model.forward_features(torch.zeros(1, 3, size, size)), True)
        params = dict(model.named_parameters())
        total = sum(p.numel() for p in params.values())
        trainable = sum(params[k].numel() for k in trainable_state_keys(model))
        rows.append(
            {
                "name": name,
                "kwargs": kwargs,
                "input": size,
                "params": total,
                "trainable_default": trainable,
                "embedding_dim": int(emb.shape[1]),
                "tokens": None if name != "hybrid" else int(model.pos_embed.weight.shape[1]),
            }
        )
        print(f"{name:20s} {total / 1e6:8.2f} M  ({time.perf_counter() - t0:.1f} s)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "model_sizes.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| model | options | input px | parameters (M) | trainable by default (M) "
        "| embedding dim | tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items() if k != "image_size") or "-"
        lines.append(
            f"| {r['name']} | {opts} | {r['input']} | {r['params'] / 1e6:.2f} "
            f"| {r['trainable_default'] / 1e6:.2f} | {r['embedding_dim']} | {r['tokens'] or '-'} |"
        )
    (OUT / "model_sizes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
