"""Benchmark: frozen-prefix extraction of the default hybrid, plain vs the fast inference copy.

Why: every cached run (central default recipe, each federated hospital, the demo) first runs
the frozen CT ResNet-152 prefix (``layer1`` .. ``layer3``) once per image on the kidney band
(224 x 336). :meth:`kidneyscan.models.frozen.FrozenSplit.features` runs an inference copy of
it with BatchNorm folded into the convolutions (``torch.fx``) in channels-last memory. This
times that path against the plain prefix in eval mode, side by side in one process
(interleaved repetitions, random inputs of the real shape), in fp32 and, where the CPU has
native bf16, under bf16 autocast, and checks that the outputs agree. With ``--onnx DATA``
(a folder of real slices) it also times the prefix exported to ONNX Runtime, in fp32 and in
static QDQ int8 (the project's int8 recipe, :func:`kidneyscan.export.quantize.quantize_onnx`,
calibrated on ``--calibration`` kidney-band ROIs of DATA), and checks whether int8 features
can stand in for fp32 ones: on ``--agreement`` other ROIs, the relative error of the feature
maps and the top-1 agreement of a linear probe trained on fp32 pooled features of two thirds
of them and applied to the last third's fp32 and int8 features. Writes
``benchmarks/results/prefix_speed.{json,md}``.

Usage::

    python benchmarks/prefix_speed.py --reps 3
    python benchmarks/prefix_speed.py --reps 3 --onnx ../shared/data/ct-kidney
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kidneyscan.config import ExperimentConfig
from kidneyscan.experiment import build_model, make_preprocessor
from kidneyscan.export.quantize import run_session
from kidneyscan.features import bf16_supported
from kidneyscan.models.frozen import FrozenSplit

REPO = Path(__file__).resolve().parents[1]
PIXELS = (3, 224, 336)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _plain(split: FrozenSplit, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = split.prefix.eval()(x)
    return out


def _onnx_paths(
    split: FrozenSplit, data: Path, n_cal: int, n_agree: int, threads: int, tmp: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """ORT fp32 and int8 sessions of the prefix, and their agreement with the torch prefix."""
    import random

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from kidneyscan.data.datasets import load_image
    from kidneyscan.export.onnx import make_session
    from kidneyscan.export.quantize import list_images, quantize_onnx
    from kidneyscan.features import OnnxPrefix

    files, labels = list_images(data)
    if labels is None:
        raise SystemExit(f"--onnx {data}: needs a labelled CT-KIDNEY folder (class folders)")
    order = list(range(len(files)))
    random.Random(0).shuffle(order)
    if len(order) < n_cal + n_agree:
        raise SystemExit(f"--onnx {data}: {len(order)} images < {n_cal} + {n_agree}")
    pre = make_preprocessor(ExperimentConfig())

    def rois(idx: list[int]) -> np.ndarray:
        return np.stack([pre(load_image(files[i])).numpy() for i in idx]).astype(np.float32)

    t0 = time.perf_counter()
    cal = rois(order[:n_cal])
    agree_idx = order[n_cal : n_cal + n_agree]
    agree = rois(agree_idx)
    t_pre = time.perf_counter() - t0
    # The fp32 graph is the feature cache's own engine (exported on its first call).
    engine = OnnxPrefix(split, tmp)
    engine(torch.from_numpy(cal[:1]))
    fp32_path = engine.path(PIXELS)
    t0 = time.perf_counter()
    int8_path = quantize_onnx(fp32_path, tmp / "prefix_int8.onnx", cal)
    t_quant = time.perf_counter() - t0
    sessions = {"ORT fp32": make_session(fp32_path, threads=threads),
                "ORT int8 (static QDQ)": make_session(int8_path, threads=threads)}  # fmt: skip
    with torch.no_grad():
        ref = np.concatenate([split.features(torch.from_numpy(agree[i : i + 8])).numpy()
                              for i in range(0, len(agree), 8)])  # fmt: skip
    y = np.array([labels[i] for i in agree_idx])
    n_fit = 2 * len(agree) // 3
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    probe.fit(ref[:n_fit].mean(axis=(2, 3)), y[:n_fit])
    ref_pred = probe.predict(ref[n_fit:].mean(axis=(2, 3)))
    quality: dict[str, Any] = {"n_calibration": n_cal, "n_agreement": len(agree),
                               "n_probe_test": len(agree) - n_fit, "preprocess_s": t_pre,
                               "quantize_s": t_quant, "paths": {}}  # fmt: skip
    for name, sess in sessions.items():
        out = run_session(sess, agree, batch=8)
        pred = probe.predict(out[n_fit:].mean(axis=(2, 3)))
        quality["paths"][name] = {
            "relative_l2": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
            "max_abs_diff": float(np.abs(out - ref).max()),
            "probe_agreement": float((pred == ref_pred).mean()),
        }
    return sessions, quality


def _store_times(split: FrozenSplit, data: Path, n: int, reps: int) -> list[dict[str, Any]]:
    """Wall time of :class:`FeatureStore` filling an empty cache for ``n`` real slices (both
    views, preprocessing and, for ONNX Runtime, the export included), per engine, alternating."""
    from kidneyscan.data.datasets import scan_dataset
    from kidneyscan.features import FeatureStore

    samples = scan_dataset(data)
    samples = [samples[i] for i in np.linspace(0, len(samples) - 1, n).astype(int)]
    pre = make_preprocessor(ExperimentConfig())
    times: dict[str, list[float]] = {"fp32": [], "onnx": []}
    export: list[float] = []
    for _ in range(reps):
        for compute in times:
            with tempfile.TemporaryDirectory(prefix="ks-store-") as root:
                t0 = time.perf_counter()
                fs = FeatureStore(split, pre, root=root, compute=compute)
                fs.load(samples)
                times[compute].append(time.perf_counter() - t0)
                if fs.onnx_prefix is not None:
                    export.append(fs.onnx_prefix.export_seconds)
    base = min(times["fp32"])
    return [{"compute": c, "images": n, "best_s": min(t), "images_per_s": n / min(t),
             "speedup": base / min(t), "all_s": t,
             "export_s": min(export) if c == "onnx" else 0.0}
            for c, t in times.items()]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Time both prefix paths side by side and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--note", default="")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument(
        "--onnx",
        type=Path,
        default=None,
        metavar="DATA",
        help="real CT-KIDNEY folder: also time ORT fp32 / int8 and check agreement",
    )
    ap.add_argument("--calibration", type=int, default=32, help="int8 calibration ROIs")
    ap.add_argument("--agreement", type=int, default=300, help="ROIs of the agreement check")
    ap.add_argument("--store", type=int, default=0, metavar="N",
                    help="with --onnx: also time the feature cache filling for N real slices, "
                    "PyTorch fp32 vs ONNX Runtime (empty cache each, alternating)")  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # per-slice ROI fallbacks would flood the console
    torch.set_num_threads(args.threads)
    model, _ = build_model(ExperimentConfig(), 4)  # the default: CT ResNet-152, fully frozen
    split = FrozenSplit(model)
    x = torch.rand(args.batch, *PIXELS)
    precisions = ["fp32", "bf16"] if bf16_supported() else ["fp32"]
    paths: dict[str, Any] = {
        "plain prefix (eval mode)": _plain,
        "fast copy (BN folded, channels-last)": None,
    }
    onnx_paths: dict[str, Any] = {}
    quality: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="ks-prefix-")
    if args.onnx is not None:
        sessions, quality = _onnx_paths(
            split, args.onnx, args.calibration, args.agreement, args.threads, Path(tmp.name)
        )
        for name, sess in sessions.items():
            onnx_paths[name] = lambda _s, x, sess=sess: torch.from_numpy(
                run_session(sess, x.numpy(), batch=len(x))
            )
    times: dict[tuple[str, str], list[float]] = {}
    outs: dict[tuple[str, str], torch.Tensor] = {}
    for prec in precisions:
        # ONNX Runtime runs its own precision: its rows sit under fp32 only.
        these = {**paths, **onnx_paths} if prec == "fp32" else paths
        for _ in range(args.reps + 1):  # the first round warms up (and builds the fast copy)
            for name, fn in these.items():
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
        for key in [k for k in times if k[0] == prec]:
            best = min(times[key][1:])
            diff = (outs[key] - ref).abs().max().item()
            q = quality.get("paths", {}).get(key[1], {})
            rows.append({"precision": prec, "path": key[1], "batch_s": best,
                         "images_per_s": args.batch / best, "speedup": base / best,
                         "max_abs_diff": diff, "ref_max_abs": ref.abs().max().item(),
                         "relative_l2_real": q.get("relative_l2"),
                         "probe_agreement": q.get("probe_agreement")})  # fmt: skip
    tmp.cleanup()
    store = _store_times(split, args.onnx, args.store, 2) if args.onnx and args.store else []
    cmd = " ".join(["python", "benchmarks/prefix_speed.py", *sys.argv[1:]])
    mach = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
    mach += f"{torch.get_num_threads()} threads"
    meta = {"command": cmd, "machine": mach, "note": args.note, "cut": split.cut,
            "batch": args.batch, "reps": args.reps,
            "quality": {k: v for k, v in quality.items() if k != "paths"},
            "store": store}  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "prefix_speed.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    lines = [
        f"# Frozen-prefix extraction of the default hybrid (pixels -> {split.cut})",
        "",
        f"| precision | prefix path | batch {args.batch} (s, best of {args.reps}) | images/s | "
        "x plain | max abs difference from plain (largest output) | relative L2 error, real "
        "ROIs | probe top-1 agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['precision']} | {r['path']} | {r['batch_s']:.2f} | {r['images_per_s']:.2f} | "
        f"{r['speedup']:.2f} | {r['max_abs_diff']:.1e} ({r['ref_max_abs']:.1f}) | "
        f"{_fmt(r['relative_l2_real'], '.1e')} | {_fmt(r['probe_agreement'], '.1%')} |"
        for r in rows
    ]
    if quality:
        lines += [
            "",
            "ONNX rows: the prefix exported to ONNX; int8 calibrated on "
            f"{quality['n_calibration']} kidney-band ROIs of `{args.onnx}` "
            f"(quantization took {quality['quantize_s']:.0f} s). "
            f"Quality on {quality['n_agreement']} other ROIs against the torch prefix: relative L2 "
            "error of the feature maps; a linear probe (logistic regression on mean-pooled "
            f"fp32 features of the first two thirds) predicts the last {quality['n_probe_test']} "
            "from fp32 and from each path's features, and the agreement of the two is shown. "
            "The timing input is random (same shape) for every row.",
        ]
    if store:
        lines += [
            "",
            f"Filling an empty feature cache (`FeatureStore.load`) for {args.store} real slices "
            "spread over the sample, both views: reading, kidney band, prefix, bf16 files; the "
            "ONNX Runtime engine's time includes exporting the prefix (once per cache folder). "
            "Best of 2, the two engines alternating:",
            "",
            "| engine | wall (s) | of which export (s) | images/s | x PyTorch fp32 |",
            "|---|---|---|---|---|",
            *[f"| {'ONNX Runtime fp32' if r['compute'] == 'onnx' else 'PyTorch fp32 (fast copy)'}"
              f" | {r['best_s']:.1f} | {r['export_s']:.1f} | {r['images_per_s']:.2f} | "
              f"{r['speedup']:.2f} |" for r in store],
        ]  # fmt: skip
    note = f"; {args.note}" if args.note else ""
    lines += ["", f"`{cmd}` ({mach}{note})", ""]
    (args.results / "prefix_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
