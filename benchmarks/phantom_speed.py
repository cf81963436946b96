"""Phantom generation speed on one core: images per second (render only, and render + write).

Writes ``benchmarks/results/phantom_speed.json`` and ``.md``. Usage::

    python benchmarks/phantom_speed.py [--n 200] [--sizes 512 256 64]

One core: OpenCV and BLAS are limited to one thread. CPU time (``time.process_time``) is
reported beside wall time because the development machine is shared; on a busy machine the
wall-clock rate understates what one free core does.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from kidneyscan.data.phantom import CLASSES, generate_dataset, make_sites, render_slice  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _time(fn, n: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    fn(0)  # warm-up: imports, allocator, OpenCV init
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {
        "n": n,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "images_per_s_wall": round(n / wall, 1),
        "images_per_s_cpu": round(n / cpu, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images per measurement")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 256, 64])
    args = ap.parse_args()
    cv2.setNumThreads(1)
    sites = make_sites(3, 0)
    rows = []
    for size in args.sizes:

        def render(i: int, size: int = size) -> None:
            render_slice(np.random.default_rng(i), CLASSES[i % 4], sites[i % 3], image_size=size)

        r = _time(render, args.n)
        with tempfile.TemporaryDirectory() as tmp:

            def write(i: int, size: int = size, tmp: str = tmp) -> None:
                if i == 0:  # one call = the whole dataset of args.n images
                    return
                generate_dataset(Path(tmp) / "d", args.n, seed=0, sites=3, image_size=size)

            w0, c0 = time.perf_counter(), time.process_time()
            write(1)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        rows.append(
            {
                "image_size": size,
                "render": r,
                "generate_dataset": {
                    "n": args.n,
                    "wall_s": round(wall, 3),
                    "cpu_s": round(cpu, 3),
                    "images_per_s_wall": round(args.n / wall, 1),
                    "images_per_s_cpu": round(args.n / cpu, 1),
                },
            }
        )
        print(json.dumps(rows[-1]))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    result = {
        "command": f"python benchmarks/phantom_speed.py --n {args.n} --sizes "
        + " ".join(map(str, args.sizes)),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared with other jobs; load average {load[0]:.1f} at the end)",
        "threads": "1 (OpenCV, BLAS)",
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "phantom_speed.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Phantom generation speed (one core)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}.",
        "",
        "| image size | render img/s (CPU time) | render img/s (wall) "
        "| render + write dataset img/s (CPU) | render + write img/s (wall) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = r["generate_dataset"]
        lines.append(
            f"| {r['image_size']} | {r['render']['images_per_s_cpu']} | "
            f"{r['render']['images_per_s_wall']} | {g['images_per_s_cpu']} | "
            f"{g['images_per_s_wall']} |"
        )
    lines.append("")
    (RESULTS / "phantom_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
