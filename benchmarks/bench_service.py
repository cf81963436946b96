"""Service throughput and memory: requests/s and p95 latency of ``/api/v1/predict`` (and of
``/api/v1/explain``, i.e. with Grad-CAM) under a bounded thread-pool load on 127.0.0.1, torch
vs ONNX Runtime backend; peak resident memory of the service and of one federated client.

Usage::

    python benchmarks/bench_service.py [--size 224] [--requests 24] [--explain-requests 8]
    python benchmarks/bench_service.py --checkpoint runs/default/checkpoint --concurrency 1 \
        --backends torch onnx onnx-int8 --no-fed        # the trained default, one slice at a time

Without ``--checkpoint`` the model is a randomly initialised hybrid (convnext_tiny); with it,
a copy of that checkpoint is exported to ONNX (and, for ``onnx-int8``, quantized with the
project's guard, calibrated on the training split of the checkpoint's own split file).

Each server is ``kidneyscan serve`` in a subprocess (Flask threaded server, one worker) on a
free port of 127.0.0.1, stopped by PID. The load is ``--concurrency`` threads each posting one
real CT JPEG per request. Peak RSS is ``VmHWM`` from ``/proc/<pid>/status``. The federated
client is one site's local training round (``kidneyscan.federated.task.train_local``) in its
own process, its peak RSS from ``resource.getrusage``. Writes ``results/bench_service.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _perf_common import (  # noqa: E402
    REAL_DATA,
    command_line,
    machine,
    machine_line,
    md_table,
    write_results,
)

CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]
FED_CLIENT = r"""
import json, resource, sys, time
from kidneyscan.data.datasets import scan_dataset
from kidneyscan.federated.task import build_model, run_config, train_local
cfg = run_config(json.loads(sys.argv[1]))
samples = scan_dataset(sys.argv[2])[: int(sys.argv[3])]
model = build_model(cfg)
t0 = time.perf_counter()
stats = train_local(model, samples, cfg)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "train_s": time.perf_counter() - t0, "images": len(samples)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _multipart(blob: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + blob
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_checkpoint(out: Path, size: int) -> Path:
    import torch

    from kidneyscan.models.checkpoint import save_checkpoint
    from kidneyscan.models.factory import create_classifier
    from kidneyscan.preprocess.pipeline import Preprocessor

    torch.manual_seed(0)
    model = create_classifier("hybrid", 4, image_size=size)
    meta = {"classes": CLASSES, "preprocessing": Preprocessor(image_size=size).to_dict()}
    return save_checkpoint(out, model, meta)


def int8_from_training_split(ckpt: Path, export_dir: Path, meta: dict[str, Any]) -> None:
    """Quantize the exported graph, calibrated on training-split images of the checkpoint's
    split file and validated (the project's guard) on its test-split images."""
    import shutil

    from kidneyscan.data.splits import load_split
    from kidneyscan.export.quantize import quantize_checkpoint

    split = load_split(meta["split_file"], root=REAL_DATA)
    folders = {}
    for part in ("train", "test"):
        folder = ckpt.parent / f"{part}_images"
        for s in split[part]:
            (folder / s.class_name).mkdir(parents=True, exist_ok=True)
            shutil.copy(s.path, folder / s.class_name / Path(s.path).name)
        folders[part] = folder
    quantize_checkpoint(
        ckpt, export_dir, folders["train"], validation=folders["test"], validation_size=10_000
    )


def load_test(url: str, blobs: list[bytes], n: int, concurrency: int) -> dict[str, Any]:
    """``n`` POSTs by ``concurrency`` threads; requests/s, p50/p95 latency, status counts."""

    def one(i: int) -> tuple[float, int]:
        body, ctype = _multipart(blobs[i % len(blobs)], f"slice{i}.jpg")
        req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        return time.perf_counter() - t0, status

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        res = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in res])
    statuses: dict[str, int] = {}
    for _, s in res:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {
        "requests": n,
        "concurrency": concurrency,
        "requests_per_s": round(n / wall, 3),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
        "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 1),
        "status": statuses,
    }


def serve_and_load(
    ckpt: Path, backend: str, blobs: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    port = _free_port()
    env = dict(
        os.environ, KIDNEYSCAN_RATE_LIMIT="0", KIDNEYSCAN_TORCH_THREADS=str(args.server_threads)
    )
    if backend.startswith("onnx"):
        env["KIDNEYSCAN_ONNX_PRECISION"] = "int8" if backend == "onnx-int8" else "fp32"
    cmd = [sys.executable, "-m", "kidneyscan", "serve", "--checkpoint", str(ckpt),
           "--port", str(port), "--backend", backend.split("-")[0]]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(base + "/health/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("server not ready after 600 s")
            time.sleep(1)
        startup = time.perf_counter() - t0
        out: dict[str, Any] = {"startup_s": round(startup, 1)}
        for ep, n in (("predict", args.requests), ("explain", args.explain_requests)):
            c0 = _cpu_seconds(proc.pid)
            out[ep] = load_test(f"{base}/api/v1/{ep}", blobs, n, args.concurrency)
            # Server CPU per request: what a request costs, independent of how much of the
            # shared CPU the server was given.
            out[ep]["server_cpu_ms_per_request"] = round(
                (_cpu_seconds(proc.pid) - c0) / n * 1000, 1
            )
            print(backend, ep, out[ep], flush=True)
        out["peak_rss_mib"] = round(_peak_rss_mib(proc.pid), 1)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def fed_client_memory(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {"model": "hybrid", "image-size": args.size, "local-epochs": 1, "batch-size": 16,
           "model-kwargs": "{}", "augment": True}  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-c", FED_CLIENT, json.dumps(cfg), str(REAL_DATA), str(args.fed_images)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"federated client failed: {res.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    out["config"] = cfg
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--requests", type=int, default=24, help="predict requests per backend")
    ap.add_argument("--explain-requests", type=int, default=8, help="Grad-CAM requests")
    ap.add_argument("--concurrency", type=int, default=4, help="client threads")
    ap.add_argument("--fed-images", type=int, default=32, help="images of the federated client")
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx"],
                    choices=["torch", "onnx", "onnx-int8"])  # fmt: skip
    ap.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: random)")
    ap.add_argument("--no-fed", action="store_true", help="skip the federated client's memory")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch / ONNX Runtime threads of the server")  # fmt: skip
    args = ap.parse_args()
    if not REAL_DATA.is_dir():
        raise SystemExit(f"needs the real sample at {REAL_DATA}")
    info = machine()
    files = sorted(REAL_DATA.rglob("*.jpg"))[:: max(1, len(list(REAL_DATA.rglob("*.jpg"))) // 16)]
    blobs = [f.read_bytes() for f in files[:16]]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ks-bench-") as tmp:
        if args.checkpoint is not None:
            import shutil

            ckpt = Path(shutil.copytree(args.checkpoint, Path(tmp) / "checkpoint"))
        else:
            ckpt = make_checkpoint(Path(tmp) / "checkpoint", args.size)
        meta = json.loads((ckpt / "metadata.json").read_text())
        if any(b.startswith("onnx") for b in args.backends):
            from kidneyscan.export.onnx import default_out_dir, export_checkpoint

            export_checkpoint(ckpt)
        if "onnx-int8" in args.backends:
            int8_from_training_split(ckpt, default_out_dir(ckpt), meta)
        for b in args.backends:
            results[b] = serve_and_load(ckpt, b, blobs, args)
    fed = None if args.no_fed else fed_client_memory(args)
    info["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    if args.checkpoint is not None:
        h, w = meta["input_size"][1:]
        model_desc = (
            f"the checkpoint `{args.checkpoint}` ({meta['model']['name']}, "
            f"{meta['model']['kwargs'].get('backbone', 'default backbone')}, {h} x {w} px, "
            "trained weights)"
        )
    else:
        model_desc = f"the hybrid (convnext_tiny, {args.size} px, random weights)"
    rows = []
    for b, r in results.items():
        for ep in ("predict", "explain"):
            t = r[ep]
            status = ", ".join(f"{k}: {v}" for k, v in t["status"].items())
            rows.append([b, f"/api/v1/{ep}" + (" (Grad-CAM)" if ep == "explain" else ""),
                         t["requests"], t["concurrency"], t["requests_per_s"], t["p50_ms"],
                         t["p95_ms"], t["server_cpu_ms_per_request"],
                         f"{1000 / t['server_cpu_ms_per_request']:.2f}", status])  # fmt: skip
    lines = [
        "### Service and memory",
        "",
        f"Command: `{command_line()}`.",
        "",
        machine_line(info) + f" Load average at end {info['load_average_end']}.",
        "",
        f"`kidneyscan serve` (Flask threaded, 1 worker) with {model_desc}, real CT JPEGs "
        f"(512 px) posted from {args.concurrency} thread(s) on 127.0.0.1:",
        "",
        md_table(
            [
                "backend",
                "endpoint",
                "requests",
                "threads",
                "requests/s (wall)",
                "p50 ms (wall)",
                "p95 ms (wall)",
                "server CPU ms/request",
                "requests per server CPU-s",
                "HTTP status",
            ],
            rows,
        ),  # fmt: skip
        "",
        md_table(
            ["process", "peak RSS MiB"],
            [
                [f"service ({b} backend, after the load)", r["peak_rss_mib"]]
                for b, r in results.items()
            ]
            + (
                [
                    [
                        f"federated client (hybrid {args.size} px, one local epoch on "
                        f"{fed['images']} images, batch 16)",
                        round(fed["peak_rss_mib"], 1),
                    ]
                ]
                if fed is not None
                else []
            ),
        ),  # fmt: skip
        "",
        "Wall-clock rates and latencies depend on the CPU share the server got on the shared "
        "machine; server CPU per request (utime + stime of the server process over the load, "
        "divided by the requests) is the load-independent cost. "
        "Requests are serialised inside one worker (one model; Grad-CAM hooks are not "
        "thread-safe), so throughput is one inference at a time; `--workers N` runs N.",
        "",
        "Load average at start and end above (other work on the 2 cores slows the wall-clock "
        "columns, not the CPU ones); servers ran with "
        f"{args.server_threads} torch / ONNX Runtime thread(s).",
    ]
    payload = {"machine": info, "service": results, "federated_client": fed, "args": vars(args)}
    write_results("bench_service", payload, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
