"""Inference speed on CPU, side by side: eager PyTorch fp32, PyTorch bf16 autocast, ONNX
Runtime fp32 and ONNX Runtime int8 (static QDQ), for the hybrid and ResNet50 at 224 px.

Reports images/s and p50/p95 latency at batch 1 and 16, FLOPs per image (PyTorch's flop
counter), achieved GFLOP/s as a percentage of an fp32 matmul peak measured in the same run,
and top-1 agreement of bf16 / ORT fp32 / ORT int8 with eager fp32 on real (or phantom) images.

Usage::

    python benchmarks/bench_inference.py [--models hybrid resnet50] [--reps 10 3]

Weights are randomly initialised (no hub access at run time): speed does not depend on the
weights, but agreement of a random network says less than that of a trained one (its logits
are close together, so it is a strict test). Writes ``results/bench_inference.{json,md}``.
"""

from __future__ import annotations

import argparse
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
    SHARED_NOTE,
    command_line,
    interleaved,
    machine,
    machine_line,
    md_table,
    summarise,
    write_results,
)
from kidneyscan.export.onnx import export_bytes, make_session  # noqa: E402
from kidneyscan.export.quantize import (  # noqa: E402
    list_images,
    preprocess_images,
    quantize_onnx,
    run_session,
    torch_logits,
)
from kidneyscan.models.factory import create_classifier  # noqa: E402
from kidneyscan.preprocess.pipeline import Preprocessor  # noqa: E402

CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]
VARIANTS = ("eager fp32", "torch bf16", "ORT fp32", "ORT int8")


def matmul_peak(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best-of-``reps`` GFLOP per CPU-second of an n x n x n matmul, fp32 and bf16."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        best = min(_timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(reps))
        out[f"{name}_gflops"] = round(2 * n**3 / best / 1e9, 1)
    return out


def _timed(fn: Any) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one forward pass at ``size`` px (PyTorch flop counter: matmul/conv FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """``n`` preprocessed real CT slices (phantom slices when the real sample is absent)."""
    pre = Preprocessor(image_size=size).to_dict()
    if REAL_DATA.is_dir():
        files, _ = list_images(REAL_DATA)
        source = "real CT-KIDNEY sample"
    else:  # pragma: no cover - machine without the shared data
        from kidneyscan.data.phantom import generate_dataset

        root = generate_dataset(Path(tempfile.mkdtemp()) / "ph", n, seed=seed, image_size=256)
        files, _ = list_images(root)
        source = "phantom"
    rng = np.random.default_rng(seed)
    pick = [files[i] for i in rng.permutation(len(files))[:n]]
    return preprocess_images(pick, pre), source


def bench_model(name: str, args: argparse.Namespace, data: np.ndarray) -> dict[str, Any]:
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"image_size": args.size} if name == "hybrid" else {}
    model = create_classifier(name, len(CLASSES), **kwargs).eval()
    meta = {"classes": CLASSES, "preprocessing": Preprocessor(image_size=args.size).to_dict()}
    flops = flops_per_image(model, args.size)
    t0 = time.perf_counter()
    blob = export_bytes(model, meta)
    export_s = time.perf_counter() - t0
    n_cal = args.calibration
    cal, val = data[:n_cal], data[n_cal:]
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "m.onnx"
        fp32_path.write_bytes(blob)
        t0 = time.perf_counter()
        quantize_onnx(fp32_path, Path(tmp) / "m8.onnx", cal)
        quant_s = time.perf_counter() - t0
        s32 = make_session(fp32_path, threads=args.threads)
        s8 = make_session(Path(tmp) / "m8.onnx", threads=args.threads)

    def bf16(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float().numpy()

    ref = torch_logits(model, val)
    others = {
        "torch bf16": np.concatenate([bf16(torch.from_numpy(val[i : i + 16])) for i in
                                      range(0, len(val), 16)]),
        "ORT fp32": run_session(s32, val),
        "ORT int8": run_session(s8, val),
    }  # fmt: skip
    agreement = {
        k: {
            "top1_agreement": float((v.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(v - ref).max()),
        }
        for k, v in others.items()
    }
    rows: dict[str, Any] = {}
    for batch, reps in zip((1, 16), args.reps, strict=True):
        x = torch.from_numpy(np.resize(data, (batch, *data.shape[1:])).copy())
        xn = x.numpy()

        def eager(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        fns = {
            "eager fp32": eager,
            "torch bf16": lambda x=x: bf16(x),
            "ORT fp32": lambda xn=xn: s32.run(["logits"], {"input": xn}),
            "ORT int8": lambda xn=xn: s8.run(["logits"], {"input": xn}),
        }
        times = interleaved(fns, reps=reps)
        rows[str(batch)] = {k: summarise(v, batch) for k, v in times.items()}
        print(name, batch, {k: v["images_per_cpu_s"] for k, v in rows[str(batch)].items()},
              flush=True)  # fmt: skip
    return {
        "flops_per_image": flops,
        "export_s": round(export_s, 2),
        "quantize_s": round(quant_s, 2),
        "agreement_vs_eager_fp32": agreement,
        "n_validation": len(val),
        "n_calibration": len(cal),
        "timings": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["hybrid", "resnet50"])
    ap.add_argument("--size", type=int, default=224, help="input side in pixels")
    ap.add_argument("--reps", type=int, nargs=2, default=[12, 3], help="timed calls, batch 1/16")
    ap.add_argument("--calibration", type=int, default=32, help="int8 calibration images")
    ap.add_argument("--validation", type=int, default=64, help="agreement images")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch + ORT threads (1: CPU time then measures the work on a shared machine)",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    peak = matmul_peak()
    data, source = images(args.calibration + args.validation, args.size)
    results = {m: bench_model(m, args, data) for m in args.models}
    info["load_average_end"] = [round(x, 1) for x in __import__("os").getloadavg()]
    payload = {"machine": info, "matmul_peak": peak, "data": source, "models": results,
               "args": vars(args)}  # fmt: skip

    lines = [
        f"### Inference (CPU, {args.size} px)",
        "",
        f"Command: `{command_line()}` ({args.threads} torch and ONNX Runtime threads).",
        "",
        machine_line(info) + f" Load average at end {info['load_average_end']}.",
        "",
        f"Matmul peak measured in this run (2048^3): fp32 {peak['fp32_gflops']} GFLOP/s, "
        f"bf16 {peak['bf16_gflops']} GFLOP/s.",
        "",
    ]
    table = []
    for m, r in results.items():
        gf = r["flops_per_image"] / 1e9
        for batch in ("1", "16"):
            base = r["timings"][batch]["eager fp32"]["images_per_cpu_s"]
            for v in VARIANTS:
                t = r["timings"][batch][v]
                achieved = gf * t["images_per_cpu_s"]
                agree = (
                    "-" if v == "eager fp32"
                    else f"{100 * r['agreement_vs_eager_fp32'][v]['top1_agreement']:.1f} %"
                )  # fmt: skip
                table.append([
                    m, batch, v, t["images_per_cpu_s"], t["p50_cpu_ms"], t["p95_cpu_ms"],
                    f"{t['images_per_cpu_s'] / base:.2f}x", f"{achieved:.1f}",
                    f"{100 * achieved / peak['fp32_gflops']:.0f} %", agree,
                ])  # fmt: skip
    lines.append(
        md_table(
            [
                "model",
                "batch",
                "variant",
                "images/CPU-s",
                "p50 CPU ms",
                "p95 CPU ms",
                "vs eager fp32",
                "GFLOP/CPU-s",
                "% fp32 peak",
                "top-1 agreement",
            ],
            table,
        )  # fmt: skip
    )
    lines += [
        "",
        f"FLOPs per image (torch.utils.flop_counter, one {args.size} px forward): "
        + ", ".join(f"{m} {r['flops_per_image'] / 1e9:.2f} GFLOP" for m, r in results.items())
        + ". GFLOP/s = FLOPs per image x images/s; bf16/int8 rows can exceed the fp32 peak.",
        "",
        "Agreement: top-1 of each variant vs eager fp32 on "
        f"{results[args.models[0]]['n_validation']}"
        f" {source} images not used for int8 calibration ({args.calibration} calibration images);"
        " random-initialised weights (no hub access), whose close logits make this a strict test.",
        "",
        SHARED_NOTE,
    ]
    write_results("bench_inference", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
