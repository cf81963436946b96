"""Load and soak test of the production service: the README's gunicorn command, 2 workers.

Usage::

    python benchmarks/bench_load.py [--checkpoint DIR] [--requests 1000] [--malformed 500]
        [--clients 8] [--time-limit 900] [--workers 2] [--data DIR]

Starts ``gunicorn -w 2 -b 127.0.0.1:<port> "kidneyscan.serve:create_app()"`` with
``KIDNEYSCAN_CHECKPOINT`` set (the README's production command; a free port instead of 8000,
``KIDNEYSCAN_RATE_LIMIT=0`` so the load is not throttled, one torch thread per worker), then
sends ``--requests`` valid predictions (real CT-KIDNEY slices from ``--data`` when it exists,
else phantom slices) with ``--malformed`` malformed uploads shuffled in, from ``--clients``
concurrent clients, stopping early at ``--time-limit`` seconds. Every malformed kind has the
4xx it must get; any other answer is counted as a mismatch. Reported: throughput, p50/p95/p99
latency, 5xx count, answers by status and kind, the RSS of each worker at start (ready), after
the first 10 % of the load (warm) and at the end, and whether any worker was restarted.

A second short run checks the rate limit across workers: ``KIDNEYSCAN_RATE_LIMIT=10`` with
2 workers, 60 sequential ``GET /api/v1/model`` calls from one client, each on a new connection.

Without ``--checkpoint`` a small checkpoint is built on the spot (randomly initialised
convnext_atto, 64 x 96 input, the default recipe's kidney-band crop first), because the
default hybrid on the CT ResNet-152 runs about one image per second on this machine.
Servers listen on 127.0.0.1 only and are stopped by PID. Writes
``results/bench_load.{json,md}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kidneyscan.data.datasets import CLASSES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _perf_common import (  # noqa: E402
    REAL_DATA,
    command_line,
    machine,
    machine_line,
    md_table,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
#: The README's production command; ``{port}`` replaces 8000 so runs never collide.
GUNICORN = ["-w", "{workers}", "-b", "127.0.0.1:{port}", "kidneyscan.serve:create_app()"]


# -- inputs -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_checkpoint(out: Path) -> Path:
    """A small random-weight checkpoint with the default recipe's kidney-band preprocessing."""
    import torch

    from kidneyscan.models.checkpoint import save_checkpoint
    from kidneyscan.models.factory import create_classifier
    from kidneyscan.preprocess.pipeline import Preprocessor

    torch.manual_seed(0)
    model = create_classifier("convnext_atto", len(CLASSES))
    prep = Preprocessor(steps=[{"name": "crop_kidney_band"}], image_size=64, image_width=96)
    meta = {
        "model": {"name": "convnext_atto", "kwargs": {}},
        "classes": list(CLASSES),
        "preprocessing": prep.to_dict(),
        "temperature": 1.0,
        "task": "kidney-ct-4class",
        "training": {"dataset": "none: random weights, built by benchmarks/bench_load.py"},
    }
    return save_checkpoint(out, model, meta)


def valid_images(data: Path | None, n: int) -> tuple[list[bytes], str]:
    """``n`` real slices (JPEG bytes) from ``data``, or phantom PNG slices when it is absent."""
    if data is not None and data.is_dir():
        files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if files:
            rng = random.Random(0)
            picked = rng.sample(files, min(n, len(files)))
            return [p.read_bytes() for p in picked], f"{len(picked)} real slices from {data}"
    from PIL import Image

    from kidneyscan.data.phantom import CLASSES as PHANTOM_CLASSES
    from kidneyscan.data.phantom import make_sites, render_slice

    site = make_sites(1, seed=0)[0]
    blobs = []
    for i in range(n):
        s = render_slice(np.random.default_rng(i), PHANTOM_CLASSES[i % 4], site, image_size=512)
        buf = io.BytesIO()
        Image.fromarray((s.image * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    return blobs, f"{n} phantom slices (512 px PNG)"


def _png_header(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR claims ``width`` x ``height`` (CRC fixed up)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _png_bomb(side: int = 8192) -> bytes:
    """A genuine grey PNG of ``side`` x ``side`` zeros: ~60 KB that inflate to side^2 bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    raw = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _dicom(**changes: Any) -> Any:
    from kidneyscan.testing.dicom import make_ct_dataset

    rng = np.random.default_rng(0)
    ds = make_ct_dataset(rng.normal(40, 20, (128, 128)))
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def _dicom_bytes(ds: Any) -> bytes:
    from kidneyscan.testing.dicom import dataset_to_bytes

    return bytes(dataset_to_bytes(ds))


def _dicom_no_pixels() -> bytes:
    ds = _dicom()
    del ds.PixelData
    return _dicom_bytes(ds)


def _dicom_nested(depth: int = 2000) -> bytes:
    """A valid CT DICOM with sequences nested ``depth`` deep (explicit VR LE, undefined lengths)."""
    base = _dicom_bytes(_dicom())
    seq = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ends = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    pos = base.index(struct.pack("<HH", 0x0008, 0x0016))  # first element after the meta group
    return base[:pos] + (seq + item) * depth + ends * depth + base[pos:]


#: kind -> (body builder, expected status). A builder returns (body, content type).
Request = tuple[bytes, str]


def multipart(blob: bytes, *, field: str = "file", filename: str | None = "slice.jpg") -> Request:
    """A multipart/form-data body with one part (a file part when ``filename`` is given)."""
    boundary = uuid.uuid4().hex
    disp = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
    head += "Content-Type: application/octet-stream\r\n\r\n" if filename else "\r\n"
    body = head.encode() + blob + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def malformed_kinds(valid: bytes) -> dict[str, tuple[Request, int]]:
    """Each malformed upload of the issue with the status the service must answer."""
    return {
        "truncated": (multipart(valid[: len(valid) // 3]), 400),
        "wrong_magic": (multipart(b"GIF89a" + os.urandom(2000)), 415),
        "huge_dimensions": (multipart(_png_header(50_000, 50_000)), 413),
        "decompression_bomb": (multipart(_png_bomb()), 413),
        "dicom_no_pixels": (multipart(_dicom_no_pixels(), filename="x.dcm"), 422),
        "dicom_nested_2000": (multipart(_dicom_nested(), filename="x.dcm"), 400),
        "empty": (multipart(b""), 400),
        # Any *file* field name is accepted on purpose (file, files, image...): a wrong field
        # name means the image is not where the API looks, i.e. a text part or another JSON key.
        "wrong_field_text_part": (multipart(b"slice.jpg", field="image", filename=None), 400),
        "wrong_field_json": (
            (json.dumps({"picture": "aGVsbG8="}).encode(), "application/json"),
            400,
        ),
    }


# -- server -----------------------------------------------------------------------------------
def _gunicorn() -> str:
    local = Path(sys.executable).parent / "gunicorn"
    return str(local) if local.exists() else "gunicorn"


def start_server(ckpt: Path, workers: int, env_extra: dict[str, str], log: Path) -> tuple:
    """The README's gunicorn command on a free port of 127.0.0.1; returns (proc, url, argv)."""
    port = _free_port()
    argv = [_gunicorn()] + [a.format(workers=workers, port=port) for a in GUNICORN]
    env = dict(os.environ)
    env.update(
        {
            "KIDNEYSCAN_CHECKPOINT": str(ckpt),
            "KIDNEYSCAN_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]),
        }
    )
    env.update(env_extra)
    env.pop("KIDNEYSCAN_API_TOKEN", None)
    fh = log.open("w")
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    history: list[list[float]] = []
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{log.read_text()}")
        # Workers load the model independently and only the loaded ones accept connections, so
        # one 200 does not mean all are up: wait for every worker's RSS to stop growing too.
        pids = workers_of(proc.pid)
        history.append([_rss_mib(p) for p in pids] if len(pids) == workers else [])
        recent = history[-4:]
        steady = len(recent) == 4 and all(
            len(r) == workers and max(abs(a - b) for a, b in zip(r, recent[0], strict=True)) < 2
            for r in recent
        )
        if steady and _ready(url):
            return proc, url, argv
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"gunicorn not ready in 300 s:\n{log.read_text()}")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health/ready", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the gunicorn master by PID (it stops its workers), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def workers_of(master: int) -> list[int]:
    """PIDs of the gunicorn workers (children of the master), sorted."""
    try:
        text = Path(f"/proc/{master}/task/{master}/children").read_text()
    except OSError:
        return []
    return sorted(int(p) for p in text.split())


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


# -- load -------------------------------------------------------------------------------------
def send(url: str, req: Request, timeout: float = 120.0) -> tuple[int, float, bytes]:
    """POST one body; (status, seconds, response body). Status 0: connection failed."""
    body, ctype = req
    r = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            return resp.status, time.perf_counter() - t0, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, time.perf_counter() - t0, exc.read()
    except OSError:
        return 0, time.perf_counter() - t0, b""


def run_load(
    url: str,
    plan: list[tuple[str, Request, int | None]],
    clients: int,
    time_limit: float,
    on_progress: Callable[[int], None],
) -> tuple[list[dict[str, Any]], float]:
    """Send ``plan`` (kind, body, expected status) from ``clients`` threads, bounded in time."""
    deadline = time.perf_counter() + time_limit
    done = 0
    lock = threading.Lock()
    out: list[dict[str, Any]] = []

    def one(item: tuple[str, Request, int | None]) -> None:
        nonlocal done
        if time.perf_counter() > deadline:
            return
        kind, req, expected = item
        status, secs, body = send(url + "/api/v1/predict", req)
        rec: dict[str, Any] = {"kind": kind, "status": status, "s": secs, "expected": expected}
        if status >= 400 or status == 0:
            try:
                rec["code"] = json.loads(body)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                rec["code"] = "not_json"
        with lock:
            out.append(rec)
            done += 1
            n = done
        on_progress(n)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, plan))
    return out, time.perf_counter() - t0


def rate_limit_check(ckpt: Path, workers: int, log: Path) -> dict[str, Any]:
    """60 sequential calls from one client with a limit of 10/min, across ``workers`` workers."""
    limit, calls = 10, 60
    proc, url, _ = start_server(
        ckpt,
        workers,
        {"KIDNEYSCAN_RATE_LIMIT": str(limit), "KIDNEYSCAN_RATE_WINDOW_S": "60"},
        log,
    )
    try:
        statuses: Counter[int] = Counter()
        for _ in range(calls):
            req = urllib.request.Request(url + "/api/v1/model", headers={"Connection": "close"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    statuses[r.status] += 1
            except urllib.error.HTTPError as exc:
                statuses[exc.code] += 1
    finally:
        stop_server(proc)
    return {
        "limit_per_window": limit,
        "workers": workers,
        "calls": calls,
        "allowed": statuses.get(200, 0),
        "refused_429": statuses.get(429, 0),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "per_worker": statuses.get(200, 0) > limit,
    }


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def main() -> None:
    """Run the load and the rate-limit check; write results/bench_load.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: build a small one")
    ap.add_argument("--requests", type=int, default=1000, help="valid predictions")
    ap.add_argument("--malformed", type=int, default=500, help="malformed uploads mixed in")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--time-limit", type=float, default=900.0, help="stop sending after (s)")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers (-w)")
    ap.add_argument("--data", type=Path, default=REAL_DATA, help="folder of real slices")
    ap.add_argument("--no-rate-check", action="store_true", help="skip the rate-limit run")
    ap.add_argument("--name", default="bench_load", help="results/<name>.{json,md}")
    args = ap.parse_args()

    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="kidneyscan-load-"))
    if args.checkpoint is None:
        ckpt = build_checkpoint(tmp / "ckpt")
        ckpt_desc = (
            "built by the script: convnext_atto, random weights, crop_kidney_band then 64 x 96"
        )
    else:
        ckpt = args.checkpoint
        ckpt_desc = str(ckpt)
    valid, valid_desc = valid_images(args.data, 48)
    kinds = malformed_kinds(valid[0])
    rng = random.Random(0)
    plan: list[tuple[str, Request, int | None]] = [
        ("valid", multipart(valid[i % len(valid)]), 200) for i in range(args.requests)
    ]
    names = sorted(kinds)
    plan += [
        (names[i % len(names)], kinds[names[i % len(names)]][0], kinds[names[i % len(names)]][1])
        for i in range(args.malformed)
    ]
    rng.shuffle(plan)

    log = tmp / "gunicorn.log"
    proc, url, argv = start_server(ckpt, args.workers, {"KIDNEYSCAN_RATE_LIMIT": "0"}, log)
    pids_start = workers_of(proc.pid)
    rss: dict[int, dict[str, float]] = {p: {"start": _rss_mib(p)} for p in pids_start}
    warm_at = max(1, len(plan) // 10)

    def progress(n: int) -> None:
        if n == warm_at:
            for p in pids_start:
                rss[p]["warm"] = _rss_mib(p)
        if n % 250 == 0:
            print(f"  {n}/{len(plan)} requests", flush=True)

    print(f"gunicorn {' '.join(argv[1:])} (master {proc.pid}, workers {pids_start})", flush=True)
    try:
        records, wall = run_load(url, plan, args.clients, args.time_limit, progress)
        pids_end = workers_of(proc.pid)
        for p in pids_start:
            rss[p]["end"] = _rss_mib(p)
        alive = _ready(url)
    finally:
        stop_server(proc)
    server_log = log.read_text()
    rate = None if args.no_rate_check else rate_limit_check(ckpt, args.workers, tmp / "rl.log")

    ok_lat = [r["s"] for r in records if r["kind"] == "valid" and r["status"] == 200]
    bad_lat = [r["s"] for r in records if r["kind"] != "valid"]
    by_status = Counter(str(r["status"]) for r in records)
    by_kind: dict[str, Counter[str]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], Counter())[f"{r['status']} {r.get('code', '')}".strip()] += 1
    mismatches = [r for r in records if r["expected"] is not None and r["status"] != r["expected"]]
    n5xx = sum(1 for r in records if r["status"] >= 500)
    growth = {
        str(p): {
            **v,
            "growth_pct": round(100 * (v["end"] - v["start"]) / v["start"], 1),
            "growth_after_warm_pct": round(100 * (v["end"] - v["warm"]) / v["warm"], 1)
            if v.get("warm")
            else None,
        }
        for p, v in rss.items()
    }
    summary = {
        "sent": len(records),
        "planned": len(plan),
        "valid_sent": sum(1 for r in records if r["kind"] == "valid"),
        "malformed_sent": sum(1 for r in records if r["kind"] != "valid"),
        "wall_s": round(wall, 1),
        "requests_per_s": round(len(records) / wall, 2),
        "valid_predictions_per_s": round(len(ok_lat) / wall, 2),
        "valid_p50_ms": _pct(ok_lat, 50),
        "valid_p95_ms": _pct(ok_lat, 95),
        "valid_p99_ms": _pct(ok_lat, 99),
        "malformed_p50_ms": _pct(bad_lat, 50),
        "malformed_p99_ms": _pct(bad_lat, 99),
        "count_5xx": n5xx,
        "connection_errors": by_status.get("0", 0),
        "unexpected_status": len(mismatches),
        "workers_restarted": pids_end != pids_start,
        "ready_after": alive,
        "max_rss_growth_pct": max(float(g["growth_pct"] or 0.0) for g in growth.values()),
        "timed_out": len(records) < len(plan),
    }
    payload = {
        "machine": info,
        "command": command_line(),
        "gunicorn": " ".join(["gunicorn", *argv[1:]]),
        "checkpoint": ckpt_desc,
        "valid_images": valid_desc,
        "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "by_status": dict(sorted(by_status.items())),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "expected_status": {k: v[1] for k, v in kinds.items()} | {"valid": 200},
        "rss_mib": growth,
        "rate_limit": rate,
        "server_log_5xx_lines": [ln for ln in server_log.splitlines() if "-> 5" in ln][:20],
        "server_log_worker_errors": [
            ln for ln in server_log.splitlines() if "WORKER TIMEOUT" in ln or "Traceback" in ln
        ][:20],
    }
    print(json.dumps(summary, indent=2))
    write_results(args.name, payload, _markdown(payload))


def _markdown(p: dict[str, Any]) -> str:
    s = p["summary"]
    lines = [
        "# Load and soak: gunicorn, 2 workers, valid and malformed uploads",
        "",
        f"Command: `{p['command']}`. Server: `KIDNEYSCAN_CHECKPOINT=<ckpt> "
        f"KIDNEYSCAN_RATE_LIMIT=0 KIDNEYSCAN_TORCH_THREADS=1 {p['gunicorn']}` (the README's "
        "production command on a free port of 127.0.0.1; rate limit off for the load). "
        f"Checkpoint: {p['checkpoint']}. Valid uploads: {p['valid_images']}, "
        f"posted to `/api/v1/predict` by {p['args']['clients']} concurrent clients with the "
        "malformed ones shuffled in (fixed seed).",
        "",
        md_table(
            ["metric", "value"],
            [
                ["requests sent / planned", f"{s['sent']} / {s['planned']}"],
                ["valid / malformed sent", f"{s['valid_sent']} / {s['malformed_sent']}"],
                ["wall time", f"{s['wall_s']} s"],
                ["throughput, all requests", f"{s['requests_per_s']} /s"],
                ["throughput, valid predictions", f"{s['valid_predictions_per_s']} /s"],
                [
                    "latency of valid predictions p50 / p95 / p99",
                    f"{s['valid_p50_ms']} / {s['valid_p95_ms']} / {s['valid_p99_ms']} ms",
                ],
                [
                    "latency of malformed uploads p50 / p99",
                    f"{s['malformed_p50_ms']} / {s['malformed_p99_ms']} ms",
                ],
                ["5xx answers (goal 0)", s["count_5xx"]],
                ["connection errors", s["connection_errors"]],
                ["answers other than the expected status", s["unexpected_status"]],
                ["workers restarted during the run", s["workers_restarted"]],
                [
                    "largest worker RSS growth start -> end (goal <= 10 %)",
                    f"{s['max_rss_growth_pct']} %",
                ],
            ],
        ),
        "",
        "Answers by kind (status and error code; expected status in brackets):",
        "",
        md_table(
            ["kind", "expected", "answers"],
            [
                [k, p["expected_status"].get(k, "?"), ", ".join(f"{c}: {n}" for c, n in v.items())]
                for k, v in p["by_kind"].items()
            ],
        ),
        "",
        "RSS of each worker (MiB; start = ready and warmed up, warm = after the first 10 % of "
        "the requests):",
        "",
        md_table(
            ["worker pid", "start", "warm", "end", "growth start -> end", "growth warm -> end"],
            [
                [
                    pid,
                    v["start"],
                    v.get("warm", ""),
                    v["end"],
                    f"{v['growth_pct']} %",
                    f"{v['growth_after_warm_pct']} %",
                ]
                for pid, v in p["rss_mib"].items()
            ],
        ),
    ]
    rate = p.get("rate_limit")
    if rate:
        lines += [
            "",
            f"Rate limit across workers: `KIDNEYSCAN_RATE_LIMIT={rate['limit_per_window']}` per "
            f"60 s, `-w {rate['workers']}`, {rate['calls']} sequential `GET /api/v1/model` from "
            f"one client on new connections: {rate['allowed']} allowed, {rate['refused_429']} "
            "refused with 429. "
            + (
                "The limit is counted per worker process (in memory), so a client gets up to "
                "workers x limit; use the proxy's limit for a hard cap (docs/serve.md)."
                if rate["per_worker"]
                else "The limit held across workers."
            ),
        ]
    lines += [
        "",
        machine_line(p["machine"]),
        "The 2 CPU cores were shared with another engineer's long benchmark while this ran, so "
        "throughput and latency measure the CPU share the server got, not the service's "
        "capacity; the 5xx count, the statuses and the memory growth do not depend on it.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
