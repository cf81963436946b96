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

RESULTS = Path(__file__).resolve().parent / "results"
REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ct-kidney"
SHARED_NOTE = (
    "The 2 CPU cores were shared with other work while this ran (load average above): "
    "absolute numbers are pessimistic and noisy; the ratios compare variants measured "
    "side by side, interleaved round-robin in one process."
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
) -> dict[str, list[float]]:
    """Time each callable ``reps`` times, round-robin, so load changes hit all variants alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(seconds: list[float], batch: int) -> dict[str, float]:
    """images/s (from the median) and p50/p95 latency in ms of one call."""
    arr = np.asarray(seconds)
    p50 = float(np.percentile(arr, 50))
    return {
        "calls": len(arr),
        "images_per_s": round(batch / p50, 2),
        "p50_ms": round(p50 * 1000, 2),
        "p95_ms": round(float(np.percentile(arr, 95)) * 1000, 2),
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
