"""Shared helpers of the perf benchmarks: machine description, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: Where results go; ``run_all.py --quick`` points this elsewhere so a smoke run does not
#: overwrite the committed results.
RESULTS = Path(
    os.environ.get("KIDNEYSCAN_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)


def _real_data() -> Path:
    # ``../shared/data/ct-kidney`` beside the checkout, or beside a parent (git worktrees);
    # KIDNEYSCAN_REAL_DATA overrides.
    if os.environ.get("KIDNEYSCAN_REAL_DATA"):
        return Path(os.environ["KIDNEYSCAN_REAL_DATA"])
    repo = Path(__file__).resolve().parents[1]
    for parent in repo.parents:
        if (parent / "shared/data/ct-kidney").is_dir():
            return parent / "shared/data/ct-kidney"
    return repo.parent / "shared/data/ct-kidney"


REAL_DATA = _real_data()
SHARED_NOTE = (
    "The 2 CPU cores were shared with up to ~18 runnable processes of other work while this "
    "ran (load average above), so wall-clock times mostly measure the share of the CPU this "
    "process got. Throughput is therefore computed from CPU time (images per CPU-second, one "
    "thread), and variants were measured side by side, interleaved round-robin in one process: "
    "read the ratios. Wall-clock latencies are kept in the JSON."
)


def command_line() -> str:
    """The exact command that ran this script, for the result tables."""
    import sys

    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def machine() -> dict[str, Any]:
    """CPU model, cores, ISA features relevant to bf16/int8, load, library versions."""
    import onnxruntime
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu)
        info["cpu_model"] = model.group(1).strip() if model else "unknown"
        flags = re.search(r"Flags:\s*(.+)", lscpu)
        wanted = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
        have = set(flags.group(1).split()) if flags else set()
        info["isa"] = [f for f in wanted if f in have]
    except (OSError, subprocess.SubprocessError):
        info["cpu_model"] = "unknown"
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One Markdown line describing the machine."""
    return (
        f"Machine: {info.get('cpu_model')}, {info['cpu_count']} logical CPUs "
        f"({', '.join(info.get('isa', []))}); torch {info['torch']} ({info['torch_threads']} "
        f"threads), ONNX Runtime {info['onnxruntime']}; load average at start "
        f"{info['load_average']}."
    )


def interleaved(
    fns: dict[str, Callable[[], Any]], *, reps: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Time each callable ``reps`` times, round-robin, so load changes hit all variants alike.

    Returns, per variant, ``wall`` and ``cpu`` seconds per call. CPU time
    (``time.process_time``, all threads of this process) is what the work cost; on a machine
    shared with other processes the wall time also counts the time slices given to them.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name]["cpu"].append(time.process_time() - c0)
            times[name]["wall"].append(time.perf_counter() - w0)
    return times


def summarise(times: dict[str, list[float]], batch: int) -> dict[str, float]:
    """images per CPU-second and per wall-second (medians), p50/p95 CPU and wall ms per call."""
    cpu, wall = np.asarray(times["cpu"]), np.asarray(times["wall"])
    return {
        "calls": len(cpu),
        "images_per_cpu_s": round(batch / float(np.median(cpu)), 3),
        "images_per_wall_s": round(batch / float(np.median(wall)), 3),
        "p50_cpu_ms": round(float(np.percentile(cpu, 50)) * 1000, 1),
        "p95_cpu_ms": round(float(np.percentile(cpu, 95)) * 1000, 1),
        "p50_wall_ms": round(float(np.percentile(wall, 50)) * 1000, 1),
        "p95_wall_ms": round(float(np.percentile(wall, 95)) * 1000, 1),
    }


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    j = RESULTS / f"{name}.json"
    m = RESULTS / f"{name}.md"
    j.write_text(json.dumps(payload, indent=2, default=str))
    m.write_text(markdown.rstrip() + "\n")
    return j, m


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
