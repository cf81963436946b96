"""Benchmark: frozen-prefix extraction of the default hybrid, plain vs the fast inference copy.

Why: every cached run (central default recipe, each federated hospital, the demo) first runs
the frozen CT ResNet-152 prefix (``layer1`` .. ``layer3``) once per image on the kidney band
(224 x 336). :meth:`kidneyscan.models.frozen.FrozenSplit.features` runs an inference copy of
it with BatchNorm folded into the convolutions (``torch.fx``) in channels-last memory. This
times that path against the plain prefix in eval mode, side by side in one process
(interleaved repetitions, random inputs of the real shape), in fp32 and, where the CPU has
native bf16, under bf16 autocast, and checks that the outputs agree. Writes
``benchmarks/results/prefix_speed.{json,md}``.

Usage::

    python benchmarks/prefix_speed.py --reps 3
"""

from __future__ import annotations

import argparse
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
from kidneyscan.features import bf16_supported
from kidneyscan.models.frozen import FrozenSplit

REPO = Path(__file__).resolve().parents[1]
PIXELS = (3, 224, 336)


def _plain(split: FrozenSplit, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = split.prefix.eval()(x)
    return out


def main(argv: list[str] | None = None) -> int:
    """Time both prefix paths side by side and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--note", default="")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = build_model(ExperimentConfig(), 4)  # the default: CT ResNet-152, fully frozen
    split = FrozenSplit(model)
    x = torch.rand(args.batch, *PIXELS)
    precisions = ["fp32", "bf16"] if bf16_supported() else ["fp32"]
    paths = {"plain prefix (eval mode)": _plain, "fast copy (BN folded, channels-last)": None}
    times: dict[tuple[str, str], list[float]] = {}
    outs: dict[tuple[str, str], torch.Tensor] = {}
    for prec in precisions:
        for _ in range(args.reps + 1):  # the first round warms up (and builds the fast copy)
            for name, fn in paths.items():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                    t0 = time.perf_counter()
                    out = fn(split, x) if fn is not None else split.features(x)
                    dt = time.perf_counter() - t0
                times.setdefault((prec, name), []).append(dt)
                outs[(prec, name)] = out.float()
    rows: list[dict[str, Any]] = []
    for prec in precisions:
        base = min(times[(prec, "plain prefix (eval mode)")][1:])
        ref = outs[(prec, "plain prefix (eval mode)")]
        for name in paths:
            best = min(times[(prec, name)][1:])
            diff = (outs[(prec, name)] - ref).abs().max().item()
            rows.append({"precision": prec, "path": name, "batch_s": best,
                         "images_per_s": args.batch / best, "speedup": base / best,
                         "max_abs_diff": diff, "ref_max_abs": ref.abs().max().item()})  # fmt: skip
    cmd = " ".join(["python", "benchmarks/prefix_speed.py", *sys.argv[1:]])
    mach = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
    mach += f"{torch.get_num_threads()} threads"
    meta = {"command": cmd, "machine": mach, "note": args.note, "cut": split.cut,
            "batch": args.batch, "reps": args.reps}  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "prefix_speed.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    lines = [
        f"# Frozen-prefix extraction of the default hybrid (pixels -> {split.cut})",
        "",
        f"| precision | prefix path | batch {args.batch} (s, best of {args.reps}) | images/s | "
        "x plain | max abs difference from plain (largest output) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['precision']} | {r['path']} | {r['batch_s']:.2f} | {r['images_per_s']:.2f} | "
        f"{r['speedup']:.2f} | {r['max_abs_diff']:.1e} ({r['ref_max_abs']:.1f}) |"
        for r in rows
    ]
    note = f"; {args.note}" if args.note else ""
    lines += ["", f"`{cmd}` ({mach}{note})", ""]
    (args.results / "prefix_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
