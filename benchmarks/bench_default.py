"""Trained checkpoints on CPU, side by side: eager PyTorch fp32, PyTorch bf16 autocast, ONNX
Runtime fp32 and ONNX Runtime int8 (static QDQ calibrated on training ROIs).

For each checkpoint (default: the default recipe's ``runs/default`` and its distilled student
``runs/student``) this reports images/s and p50 / p95 latency at batch 1 and 16, FLOPs per
image, and on the held-out test split of the checkpoint's own split file: top-1 agreement of
each variant with eager fp32 and its macro-F1 (the quality guard: >= 99 % agreement,
<= 0.01 macro-F1 drop). int8 is calibrated on training-split images only (the kidney-band
ROIs the model trained on), never on the test images it is judged on.

Usage::

    python benchmarks/bench_default.py --data ../shared/data/ct-kidney \
        --checkpoint default=runs/default/checkpoint --checkpoint student=runs/student/checkpoint

Throughput is per CPU-second with one torch / ONNX Runtime thread (the machine may be
shared; variants run interleaved, so read the ratios). Writes
``results/bench_default.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
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
    RESULTS,
    command_line,
    interleaved,
    machine,
    machine_line,
    md_table,
    summarise,
    write_results,
)
from kidneyscan.data.splits import load_split  # noqa: E402
from kidneyscan.evaluation.metrics import classification_metrics  # noqa: E402
from kidneyscan.export.onnx import export_bytes, make_session  # noqa: E402
from kidneyscan.export.quantize import (  # noqa: E402
    preprocess_images,
    quantize_onnx,
    run_session,
    torch_logits,
)
from kidneyscan.models.checkpoint import load_checkpoint  # noqa: E402

CPU_TIME_NOTE = (
    "Throughput is computed from CPU time (images per CPU-second, one thread), so it does not "
    "depend on what else ran (load average above); variants were measured side by side, "
    "interleaved round-robin in one process: read the ratios. Wall-clock latencies are kept "
    "in the JSON."
)
VARIANTS = ("eager fp32", "torch bf16", "ORT fp32", "ORT int8")
REPO = Path(__file__).resolve().parents[1]


def _bf16_logits(model: torch.nn.Module, x: np.ndarray, batch: int = 16) -> np.ndarray:
    outs = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(x[i : i + batch])).float().numpy())
    return np.concatenate(outs)


def flops_per_image(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward pass (PyTorch flop counter: matmul / conv FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, *shape))
    return float(counter.get_total_flops())


def bench_checkpoint(ckpt: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Quality and speed of the four variants of one checkpoint."""
    model, meta = load_checkpoint(ckpt)
    classes = list(meta["classes"])
    split = load_split(meta["split_file"], root=data)
    train, test = list(split["train"]), list(split["test"])
    random.Random(0).shuffle(train)
    t0 = time.perf_counter()
    cal = preprocess_images([s.path for s in train[: args.calibration]], meta["preprocessing"])
    val = preprocess_images([s.path for s in test], meta["preprocessing"])
    labels = np.array([s.label for s in test])
    prep_s = time.perf_counter() - t0
    shape = tuple(int(v) for v in val.shape[1:])
    flops = flops_per_image(model, shape)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "m.onnx"
        t0 = time.perf_counter()
        fp32_path.write_bytes(export_bytes(model, meta))
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantize_onnx(fp32_path, Path(tmp) / "m8.onnx", cal)
        quant_s = time.perf_counter() - t0
        s32 = make_session(fp32_path, threads=args.threads)
        s8 = make_session(Path(tmp) / "m8.onnx", threads=args.threads)
    logits = {
        "eager fp32": torch_logits(model, val),
        "torch bf16": _bf16_logits(model, val),
        "ORT fp32": run_session(s32, val),
        "ORT int8": run_session(s8, val),
    }
    ref = logits["eager fp32"].argmax(1)
    quality = {}
    for v, z in logits.items():
        e = np.exp(z - z.max(1, keepdims=True))
        m = classification_metrics(labels, e / e.sum(1, keepdims=True), classes, n_bootstrap=0)
        quality[v] = {
            "top1_agreement": float((z.argmax(1) == ref).mean()),
            "max_abs_logit_diff": float(np.abs(z - logits["eager fp32"]).max()),
            "macro_f1": float(m["macro"]["f1"]),
        }
    timings: dict[str, Any] = {}
    for batch, reps in zip((1, 16), args.reps, strict=True):
        x = torch.from_numpy(np.resize(val, (batch, *shape)).copy())
        xn = x.numpy()

        def eager(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        def bf16(x: torch.Tensor = x) -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)

        fns = {
            "eager fp32": eager,
            "torch bf16": bf16,
            "ORT fp32": lambda xn=xn: s32.run(["logits"], {"input": xn}),
            "ORT int8": lambda xn=xn: s8.run(["logits"], {"input": xn}),
        }
        times = interleaved(fns, reps=reps)
        timings[str(batch)] = {k: summarise(t, batch) for k, t in times.items()}
        print(ckpt, batch, {k: t["images_per_cpu_s"] for k, t in timings[str(batch)].items()},
              flush=True)  # fmt: skip
    return {
        "checkpoint": str(ckpt),
        "model": meta["model"],
        "input": list(shape),
        "flops_per_image": flops,
        "preprocess_s": round(prep_s, 1),
        "export_s": round(export_s, 1),
        "quantize_s": round(quant_s, 1),
        "n_calibration": len(cal),
        "n_test": len(val),
        "quality": quality,
        "timings": timings,
    }


def _earlier_results(measured: set[str]) -> dict[str, Any]:
    """The previous run's results of the checkpoints not measured in this one."""
    path = RESULTS / "bench_default.json"
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())["results"]
    return {k: v for k, v in previous.items() if k not in measured}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REAL_DATA)
    ap.add_argument(
        "--checkpoint", action="append", metavar="NAME=DIR",
        help="checkpoint to measure (repeatable); default: runs/default and runs/student",
    )  # fmt: skip
    ap.add_argument("--reps", type=int, nargs=2, default=[10, 3], help="timed calls, batch 1/16")
    ap.add_argument("--calibration", type=int, default=64, help="int8 calibration images")
    ap.add_argument("--threads", type=int, default=1, help="torch + ONNX Runtime threads")
    ap.add_argument(
        "--keep-earlier", action="store_true",
        help="keep the previous results of checkpoints not measured now (marked as such)",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = args.checkpoint or [
        f"default={REPO / 'runs/default/checkpoint'}",
        f"student={REPO / 'runs/student/checkpoint'}",
    ]
    ckpts = {p.split("=", 1)[0]: Path(p.split("=", 1)[1]) for p in pairs}
    for name, path in list(ckpts.items()):
        if not (path / "metadata.json").is_file():
            print(f"skipping {name}: no checkpoint at {path} (train it first)", flush=True)
            del ckpts[name]
    if not ckpts:
        sys.exit("no checkpoint to measure: run `kidneyscan train` / `kidneyscan distill` first")
    info = machine()
    results = {name: bench_checkpoint(path, args.data, args) for name, path in ckpts.items()}
    earlier = _earlier_results(set(results)) if args.keep_earlier else {}
    results |= earlier
    info["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    payload = {"machine": info, "results": results, "args": vars(args) | {"data": str(args.data)}}

    rows = []
    for name, r in results.items():
        shown = f"{name} (earlier run)" if name in earlier else name
        for batch in ("1", "16"):
            base = r["timings"][batch]["eager fp32"]["images_per_cpu_s"]
            for v in VARIANTS:
                t, q = r["timings"][batch][v], r["quality"][v]
                rows.append([
                    shown, batch, v, t["images_per_cpu_s"], t["p50_cpu_ms"], t["p95_cpu_ms"],
                    f"{t['images_per_cpu_s'] / base:.2f}x",
                    "-" if v == "eager fp32" else f"{100 * q['top1_agreement']:.1f} %",
                    f"{q['macro_f1']:.3f}",
                ])  # fmt: skip
    lines = [
        "### Trained checkpoints: inference variants (CPU, one thread)",
        "",
        f"Command: `{command_line()}`.",
        "",
        machine_line(info) + f" Load average at end {info['load_average_end']}.",
        "",
        md_table(
            [
                "checkpoint",
                "batch",
                "variant",
                "images/CPU-s",
                "p50 CPU ms",
                "p95 CPU ms",
                "vs eager fp32",
                "top-1 agreement",
                "test macro-F1",
            ],
            rows,
        ),  # fmt: skip
        "",
    ]
    for name, r in results.items():
        lines.append(
            f"- {name}: `{r['model']['name']}` {r['input'][1]} x {r['input'][2]} px, "
            f"{r['flops_per_image'] / 1e9:.1f} GFLOP per image; int8 calibrated on "
            f"{r['n_calibration']} training-split ROIs, judged on the {r['n_test']} test-split "
            "images of its split file."
        )
    if earlier:
        lines.append(
            f"- {', '.join(earlier)}: not re-measured by this command; rows copied from the "
            "previous `bench_default.json` (`--keep-earlier`), measured on the same kind of "
            "machine in another process."
        )
    if {"default", "student"} <= results.keys():
        t, s = results["default"]["timings"], results["student"]["timings"]
        ratios = ", ".join(
            f"{v} batch {b}: {s[b][v]['images_per_cpu_s'] / t[b][v]['images_per_cpu_s']:.1f}x"
            for b in ("1", "16")
            for v in ("eager fp32", "ORT int8")
        )
        lines.append(f"- student vs default, images per CPU-second: {ratios}.")
    lines += ["", CPU_TIME_NOTE]
    write_results("bench_default", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
