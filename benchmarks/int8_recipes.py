"""int8 recipes for a trained checkpoint, side by side: which calibration keeps the quality
guard (>= 99 % top-1 agreement with fp32 PyTorch)?

Every recipe goes through the product's :func:`kidneyscan.export.quantize.quantize_onnx`
(static QDQ, per-channel symmetric int8 weights, uint8 activations) with one option changed:
the op types given int8 kernels, MinMax extremes over batches of 16 vs per-image ranges
averaged over single images (ONNX Runtime's ``CalibMovingAverage``), and whether the
high-resolution convolutions (output stride <= 4) stay float. All are calibrated on the same
training-split ROIs of the checkpoint's split file; the recipe is chosen on the
**validation** split's agreement, and the test split is reported beside it (never used to
choose). Speed: CPU ms per image at batch 1, one ONNX Runtime thread, next to
ORT fp32 and eager PyTorch fp32. Writes ``results/int8_recipes.{json,md}``.

Usage::

    python benchmarks/int8_recipes.py --checkpoint runs/default/checkpoint --calibration 64
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _perf_common import (  # noqa: E402
    REAL_DATA,
    command_line,
    interleaved,
    machine,
    machine_line,
    md_table,
    summarise,
    write_results,
)
from kidneyscan.data.splits import load_split  # noqa: E402
from kidneyscan.export.onnx import export_bytes, make_session  # noqa: E402
from kidneyscan.export.quantize import (  # noqa: E402
    preprocess_images,
    quantize_onnx,
    run_session,
    torch_logits,
)
from kidneyscan.models.checkpoint import load_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: name -> quantize_onnx options; the last is the product's default recipe.
RECIPES: dict[str, dict[str, Any]] = {
    "MinMax, batches of 16, all int8 (before)": {"moving_average": False, "float_stride": 0},
    "MinMax, batches of 16, Conv only": {
        "moving_average": False,
        "float_stride": 0,
        "op_types": ("Conv",),
    },
    "MinMax moving average, single images, all int8": {"float_stride": 0},
    "MinMax, batches of 16, stride <= 4 convs float": {"moving_average": False},
    "MinMax moving average, stride <= 4 convs float (default)": {},
}


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose arg-max agrees."""
    return float((a.argmax(1) == b.argmax(1)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=REPO / "runs/default/checkpoint")
    ap.add_argument("--data", type=Path, default=REAL_DATA)
    ap.add_argument("--calibration", type=int, default=64, help="training-split images")
    ap.add_argument("--reps", type=int, default=4, help="timed batch-1 calls per variant")
    args = ap.parse_args()
    if not (args.checkpoint / "metadata.json").is_file():
        sys.exit(f"no checkpoint at {args.checkpoint}: run `kidneyscan train` first")
    # Quality on both cores; timing below on one thread, as in the other performance tables.
    torch.set_num_threads(2)
    info = machine()
    model, meta = load_checkpoint(args.checkpoint)
    split = load_split(meta["split_file"], root=args.data)
    train = list(split["train"])
    random.Random(0).shuffle(train)
    prep = meta["preprocessing"]
    cal = preprocess_images([s.path for s in train[: args.calibration]], prep)
    val = preprocess_images([s.path for s in split["val"]], prep)
    test = preprocess_images([s.path for s in split["test"]], prep)
    ref_val, ref_test = torch_logits(model, val), torch_logits(model, test)
    rows: list[dict[str, Any]] = []
    sessions: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ks-int8-recipes-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        fp32.write_bytes(export_bytes(model, meta))
        sessions["ORT fp32"] = make_session(fp32, threads=1)
        paths: dict[str, Path] = {}
        for i, (name, options) in enumerate(RECIPES.items()):
            t0 = time.perf_counter()
            path = quantize_onnx(fp32, Path(tmp) / f"m{i}.onnx", cal, **options)
            seconds = time.perf_counter() - t0
            session = make_session(path, threads=2)
            q_val, q_test = run_session(session, val), run_session(session, test)
            paths[name] = path
            rows.append(
                {
                    "recipe": name,
                    "options": {
                        k: list(v) if isinstance(v, tuple) else v for k, v in options.items()
                    },
                    "agreement_val": agreement(q_val, ref_val),
                    "agreement_test": agreement(q_test, ref_test),
                    "max_abs_logit_diff_val": float(np.abs(q_val - ref_val).max()),
                    "quantize_s": round(seconds, 1),
                }
            )
            print(rows[-1], flush=True)
        torch.set_num_threads(1)
        sessions |= {name: make_session(path, threads=1) for name, path in paths.items()}
        x = test[:1]

        def eager() -> None:
            with torch.inference_mode():
                model(torch.from_numpy(x))

        fns = {"eager fp32": eager} | {
            name: (lambda s=s: s.run(["logits"], {"input": x})) for name, s in sessions.items()
        }
        timing = {k: summarise(t, 1) for k, t in interleaved(fns, reps=args.reps).items()}
    info["load_average_end"] = [round(v, 1) for v in os.getloadavg()]
    eager_ms = timing["eager fp32"]["p50_cpu_ms"]
    table = [
        ["eager PyTorch fp32 (reference)", "-", "-", "-", eager_ms, "1.00x"],
        ["ORT fp32", "-", "-", "-", timing["ORT fp32"]["p50_cpu_ms"],
         f"{eager_ms / timing['ORT fp32']['p50_cpu_ms']:.2f}x"],
    ]  # fmt: skip
    for r in rows:
        ms = timing[r["recipe"]]["p50_cpu_ms"]
        r["p50_cpu_ms_batch1"] = ms
        table.append([
            r["recipe"], f"{100 * r['agreement_val']:.1f} %", f"{100 * r['agreement_test']:.1f} %",
            f"{r['max_abs_logit_diff_val']:.2f}", ms, f"{eager_ms / ms:.2f}x",
        ])  # fmt: skip
    lines = [
        "### int8 recipes for the default checkpoint",
        "",
        f"Command: `{command_line()}`.",
        "",
        machine_line(info) + f" Load average at end {info['load_average_end']}.",
        "",
        f"Calibrated on {len(cal)} training-split ROIs; agreement with fp32 PyTorch on the "
        f"{len(val)} validation-split slices (where the recipe is chosen) and the {len(test)} "
        "test-split slices (reported only); the guard needs >= 99 %. Quality runs used 2 "
        "threads; the timings one torch / ONNX Runtime thread, interleaved.",
        "",
        md_table(
            [
                "recipe",
                "agreement, val",
                "agreement, test",
                "max abs logit diff, val",
                "p50 CPU ms, batch 1",
                "vs eager fp32",
            ],
            table,
        ),  # fmt: skip
        "",
    ]
    settings = {k: str(v) for k, v in vars(args).items()}
    payload = {"machine": info, "rows": rows, "timing": timing, "args": settings}
    write_results("int8_recipes", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
