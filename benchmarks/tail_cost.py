"""Benchmark: cost of one training step of the default hybrid (CT ResNet-152, kidney band
224 x 336), on cached-prefix features vs through the network, per freeze depth.

Why: the fully frozen default trains only the token projection, the encoder and the head on
features cached once per image; without the cache every step also runs the frozen ResNet-152
prefix on pixels, and the mission's 80 % frozen variant trains the last backbone blocks too.
This times the tails side by side (forward + backward + AdamW step, batch 8, interleaved
repetitions, random inputs of the real shapes) so the choices read as ratios: cached vs
uncached (issue: cached epochs >= 10x faster) and fully frozen vs 80 % frozen. ``--bf16``
runs every step under bf16 autocast, as the default recipe does where the CPU has native
bf16. Two more tails read the full 14 x 21 layer3 grid (294 tokens instead of the default's
2 x 2 max-pooled 77), with and without 75 % token dropout; next to the training step, the
tail's inference forward (eval mode, every token) is timed, which is what token dropout does
not save. Token dropout rows on the default 7 x 11 grid (50 %, 75 %) and at 90 % on the full
grid come with their uncached twins; the cached/uncached ratio of each such pair is listed
under the table. Writes ``benchmarks/results/<name>.{json,md}`` (``--name``, default ``tail_cost``).

Usage::

    python benchmarks/tail_cost.py --reps 3 --bf16
    python benchmarks/tail_cost.py --reps 3 --name tail_cost_fp32     # a CPU without bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kidneyscan.config import ExperimentConfig
from kidneyscan.experiment import build_model
from kidneyscan.models.frozen import FrozenSplit

REPO = Path(__file__).resolve().parents[1]
PIXELS = (3, 224, 336)


def _tail(freeze: float, options: dict[str, Any]) -> tuple[FrozenSplit, tuple[int, ...]]:
    cfg = ExperimentConfig()
    kwargs = {**cfg.model_kwargs, "freeze_fraction": freeze, **options}
    model, _ = build_model(cfg.replace(model_kwargs=kwargs, weights="none"), 4)
    split = FrozenSplit(model)
    with torch.no_grad():
        shape = tuple(split.features(torch.zeros(1, *PIXELS)).shape[1:])
    return split, shape


def _step(split: FrozenSplit, shape: tuple[int, ...], pixels: bool, batch: int) -> float:
    """Seconds of one training step: tail on cached features, or prefix (no grad) + tail."""
    tail = split.tail
    tail.train()
    params = [p for p in tail.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, *(PIXELS if pixels else shape))
    y = torch.randint(0, 4, (batch,))
    t0 = time.perf_counter()
    feats = split.features(x) if pixels else x
    loss = torch.nn.functional.cross_entropy(tail(feats).float(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def _infer(split: FrozenSplit, shape: tuple[int, ...], batch: int) -> float:
    """Seconds of the tail's inference forward on cached features (eval mode, no autograd)."""
    tail = split.tail
    tail.eval()
    x = torch.randn(batch, *shape)
    t0 = time.perf_counter()
    with torch.no_grad():
        tail(x)
    return time.perf_counter() - t0


def _pairs(variants: dict[str, tuple[float, dict[str, Any], bool]]) -> list[tuple[str, str]]:
    """(cached, uncached) variant names with the same freeze depth and options."""
    uncached = {(f, json.dumps(o, sort_keys=True)): n for n, (f, o, px) in variants.items() if px}
    return [
        (name, uncached[key])
        for name, (freeze, options, pixels) in variants.items()
        if not pixels and (key := (freeze, json.dumps(options, sort_keys=True))) in uncached
    ]


def main(argv: list[str] | None = None) -> int:
    """Time the tails side by side and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast, as the recipe on bf16 CPUs")
    ap.add_argument("--note", default="")
    ap.add_argument("--name", default="tail_cost", help="result file stem under --results")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    full_grid = {"token_pool": 1}
    variants: dict[str, tuple[float, dict[str, Any], bool]] = {
        "fully frozen (default), cached features: layer3 tokens, encoder, head": (1.0, {}, False),
        "fully frozen, uncached: frozen ResNet-152 prefix on pixels + the same tail": (
            1.0,
            {},
            True,
        ),
        "80 % frozen, layer3 tokens: last 8 layer3 blocks + encoder + head": (0.8, {}, False),
        "80 % frozen, layer4 tokens: last 8 layer3 + 3 layer4 blocks + encoder + head": (
            0.8,
            {"token_stage": -1},
            False,
        ),
        "fully frozen, cached, all 294 layer3 tokens (no 2 x 2 pooling)": (1.0, full_grid, False),
        "fully frozen, cached, all 294 layer3 tokens, 75 % token dropout": (
            1.0,
            {**full_grid, "token_drop": 0.75},
            False,
        ),
        "fully frozen, cached, all 294 layer3 tokens, 90 % token dropout": (
            1.0,
            {**full_grid, "token_drop": 0.9},
            False,
        ),
        "fully frozen, uncached, all 294 layer3 tokens, 90 % token dropout": (
            1.0,
            {**full_grid, "token_drop": 0.9},
            True,
        ),
    }
    for drop in (0.5, 0.75):
        for pixels, how in ((False, "cached"), (True, "uncached")):
            name = f"fully frozen, {how}, 7 x 11 tokens, {drop * 100:.0f} % token dropout"
            variants[name] = (1.0, {"token_drop": drop}, pixels)
    built = {
        name: (*_tail(freeze, options), pixels)
        for name, (freeze, options, pixels) in variants.items()
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    infer: dict[str, list[float]] = {name: [] for name in variants if not variants[name][2]}
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    )
    for rep in range(args.reps + 1):  # the first pass warms up and is not counted
        for name, (split, shape, pixels) in built.items():
            with autocast:
                seconds = _step(split, shape, pixels, args.batch)
                forward = None if pixels else _infer(split, shape, args.batch)
            if rep:
                times[name].append(seconds)
                if forward is not None:
                    infer[name].append(forward)
    base = min(times[next(iter(times))])
    base_infer = min(infer[next(iter(infer))])
    rows = []
    for name, (split, shape, pixels) in built.items():
        best = min(times[name])
        n_train = sum(p.numel() for p in split.tail.parameters() if p.requires_grad)
        rows.append(
            {
                "tail": name,
                "cut": ("pixels " + " x ".join(map(str, PIXELS)) + " -> " if pixels else "")
                + split.cut,
                "feature_shape": list(shape),
                "trainable_params": n_train,
                "step_s": best,
                "images_per_s": args.batch / best,
                "ratio": best / base,
                "infer_s": min(infer[name]) if name in infer else None,
                "infer_ratio": min(infer[name]) / base_infer if name in infer else None,
            }
        )
    meta = {
        "command": "python benchmarks/tail_cost.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads",
        "note": args.note,
        "batch": args.batch,
        "bf16": args.bf16,
        "reps": args.reps,
    }
    speedups = []
    for cached, uncached in _pairs(variants):
        options = variants[cached][1]
        speedups.append(
            {
                "cached": cached,
                "uncached": uncached,
                "label": ", ".join(f"{k}={v}" for k, v in options.items()) or "the default tail",
                "speedup": min(times[uncached]) / min(times[cached]),
            }
        )
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "speedups": speedups}, indent=2)
    )
    lines = [
        "# Training-step cost of the default hybrid: cached vs uncached, per freeze depth"
        + (" (bf16 autocast)" if args.bf16 else " (fp32)"),
        "",
        "| tail | input of the step | trainable parameters | step, batch "
        f"{args.batch} (s, best of {args.reps}) | images/s | x fully frozen, cached | "
        "inference forward of the tail (s) | x default's forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grid = " x ".join(str(v) for v in r["feature_shape"])
        infer_cells = (
            f"{r['infer_s']:.2f} | {r['infer_ratio']:.1f}" if r["infer_s"] is not None else "- | -"
        )
        lines.append(
            f"| {r['tail']} | {r['cut']} ({grid}) | {r['trainable_params'] / 1e6:.1f} M | "
            f"{r['step_s']:.2f} | {r['images_per_s']:.1f} | {r['ratio']:.1f} | {infer_cells} |"
        )
    lines += ["", "Cached vs uncached, the same tail and recipe (the issue's >= 10x):", ""]
    lines += [f"- {p['label']}: **{p['speedup']:.1f}x**" for p in speedups]
    lines += [
        "",
        f"`{meta['command'].strip()}` ({meta['machine']}{'; ' + args.note if args.note else ''})",
        "",
    ]
    (args.results / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
