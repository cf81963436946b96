"""Run the whole performance suite and refresh ``benchmarks/results/performance.md`` (the
README's performance section) plus ``performance.png``.

Usage::

    python benchmarks/run_all.py            # run every bench_*.py, then assemble
    python benchmarks/run_all.py --quick    # smoke run: 96 px, few repetitions, written to
                                            # a temporary folder (committed results untouched)
    python benchmarks/run_all.py --assemble-only   # rebuild the page from existing results

Each script runs in its own process, one after the other (never in parallel: they would
measure each other), with the same Python and ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRIPTS = ("bench_default", "int8_recipes", "bench_inference", "bench_training", "bench_service")
QUICK = {
    "bench_default": ["--reps", "2", "1", "--calibration", "8"],
    "int8_recipes": ["--reps", "1", "--calibration", "8"],
    "bench_inference": ["--size", "96", "--reps", "3", "2", "--calibration", "8",
                        "--validation", "16"],
    "bench_training": ["--size", "96", "--steps", "2", "--acc-epochs", "1", "--acc-train", "32",
                       "--acc-val", "16"],
    "bench_service": ["--size", "96", "--requests", "4", "--explain-requests", "2",
                      "--fed-images", "8"],
}  # fmt: skip


def plot(path: Path) -> Path | None:
    """Bar chart of inference images per CPU-second per variant from bench_inference.json."""
    src = RESULTS / "bench_inference.json"
    if not src.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(src.read_text())["models"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, batch in zip(axes, ("1", "16"), strict=True):
        width = 0.8 / max(1, len(data))
        for i, (model, r) in enumerate(data.items()):
            variants = list(r["timings"][batch])
            vals = [r["timings"][batch][v]["images_per_cpu_s"] for v in variants]
            xs = [j + i * width for j in range(len(variants))]
            bars = ax.bar(xs, vals, width, label=model)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
            ax.set_xticks([j + width * (len(data) - 1) / 2 for j in range(len(variants))])
            ax.set_xticklabels(variants, fontsize=8)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("images per CPU-second (1 thread)")
        ax.legend(fontsize=8)
    fig.suptitle("CPU inference throughput, 1 thread (median; shared machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def assemble() -> Path:
    """Concatenate the per-script Markdown tables into ``performance.md``."""
    parts = [
        "## Performance",
        "",
        "Produced by `python benchmarks/run_all.py` (each table names its own script and "
        "options). All variants of a table were measured side by side in one process; read "
        "the ratios, the absolute numbers depend on how busy the shared CPU was.",
        "",
    ]
    if plot(RESULTS / "performance.png"):
        # Path relative to the repository root: the lead includes this page in the README.
        parts += ["![CPU inference throughput](benchmarks/results/performance.png)", ""]
    for name in SCRIPTS:
        md = RESULTS / f"{name}.md"
        if md.is_file():
            parts += [md.read_text().rstrip(), ""]
        else:
            parts += [f"_{name}: no results yet (run `python benchmarks/{name}.py`)._", ""]
    out = RESULTS / "performance.md"
    out.write_text("\n".join(parts).rstrip() + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these scripts")
    ap.add_argument("--assemble-only", action="store_true", help="do not run, only assemble")
    args = ap.parse_args()
    global RESULTS
    if args.quick:
        RESULTS = Path(tempfile.mkdtemp(prefix="kidneyscan-bench-quick-"))
    env = dict(os.environ, KIDNEYSCAN_BENCH_RESULTS=str(RESULTS))
    failed = []
    if not args.assemble_only:
        for name in args.only or SCRIPTS:
            cmd = [sys.executable, str(HERE / f"{name}.py"), *(QUICK[name] if args.quick else [])]
            print(f"== {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, env=env)
            print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
            if rc:
                failed.append(name)
    print(f"wrote {assemble()}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
