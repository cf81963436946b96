"""Privacy and deployment numbers: epsilon per round, a real loopback deployment, a dropout.

    python benchmarks/federated_deploy.py            # all parts (about 2 minutes on 2 cores)
    python benchmarks/federated_deploy.py --skip-deploy

Writes ``benchmarks/results/federated_deploy.json`` and ``.md``:

1. epsilon after N rounds (Opacus RDP, delta = 1e-5) for several noise multipliers and for
   all 3 hospitals per round (q = 1) vs 3 of 10 (q = 0.3);
2. the smoke app on SuperLink + 3 SuperNodes with TLS and node authentication, 3 rounds: wall
   time of ``flwr run``, time per round, bytes per round (model arrays up/down and the
   SuperLink's traffic counter);
3. the same federation with one SuperNode stopped (SIGTERM) mid-round: when its loss was
   reported and how long the round took.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kidneyscan.federated import deploy
from kidneyscan.federated.privacy import PrivacyAccountant

RESULTS = Path(__file__).resolve().parent / "results"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def epsilon_table(rounds: tuple[int, ...] = (1, 5, 10, 20, 50)) -> list[dict[str, Any]]:
    """Epsilon after each number of rounds, per (noise multiplier, sampling rate)."""
    rows = []
    for q, label in ((1.0, "3 of 3"), (0.3, "3 of 10")):
        for sigma in (0.5, 1.0, 2.0, 4.0):
            acc = PrivacyAccountant(sigma, q, 1e-5)
            row: dict[str, Any] = {"sampled": label, "q": q, "noise_multiplier": sigma}
            row.update({f"eps@{n}": round(acc.epsilon_after(n), 3) for n in rounds})
            rows.append(row)
    return rows


def plot_epsilon(path: Path, max_rounds: int = 50) -> Path:
    """Epsilon vs rounds for each noise multiplier, q = 1 and q = 0.3 side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = list(range(1, max_rounds + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (q, title) in zip(
        axes, ((1.0, "3 of 3 hospitals per round"), (0.3, "3 of 10")), strict=True
    ):
        for sigma in (0.5, 1.0, 2.0, 4.0):
            acc = PrivacyAccountant(sigma, q, 1e-5)
            ax.plot(rounds, [acc.epsilon_after(n) for n in rounds], label=f"sigma = {sigma}")
        ax.set_title(f"{title} (q = {q:g})")
        ax.set_xlabel("rounds")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("epsilon at delta = 1e-5 (hospital-level)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def deployment(workdir: Path, rounds: int) -> dict[str, Any]:
    """Smoke app on TLS + auth loopback federation; timings and bytes."""
    app = deploy.write_smoke_app(workdir / "app")
    fed = deploy.LocalFederation(
        workdir / "fed", num_nodes=3, tls=True, auth=True, env={"PYTHONPATH": SRC}
    )
    t0 = time.perf_counter()
    try:
        fed.start()
        started = time.perf_counter() - t0
        outcome = fed.run(
            app, {"num-server-rounds": rounds, "min-clients": 3, "out-dir": str(workdir / "out")}
        )
    finally:
        left = fed.stop()
    result = json.loads((workdir / "out" / "smoke_result.json").read_text())
    return {
        "status": outcome.status,
        "rounds": rounds,
        "start_federation_s": round(started, 1),
        "flwr_run_wall_s": round(outcome.wall_s, 1),
        "strategy_wall_s": round(result["wall_s"], 1),
        "s_per_round": round(result["wall_s"] / rounds, 1),
        "array_bytes_down_per_round": result["rounds"][0]["bytes_sent"],
        "array_bytes_up_per_round": result["rounds"][0]["bytes_received"],
        "superlink_traffic": outcome.traffic,
        "accuracy": result["accuracy"],
        "leftover_processes": left,
    }


def dropout(workdir: Path) -> dict[str, Any]:
    """SIGTERM one SuperNode while it trains in round 1 of 2."""
    app = deploy.write_smoke_app(workdir / "app")
    fed = deploy.LocalFederation(workdir / "fed", num_nodes=3, tls=False, env={"PYTHONPATH": SRC})
    out = workdir / "out"
    marker = out / "partition-2.training"
    times: dict[str, float] = {}
    try:
        fed.start()

        def kill() -> None:
            while not marker.exists():
                time.sleep(0.1)
            times["killed"] = time.perf_counter()
            fed.nodes[2].signal(signal.SIGTERM)

        threading.Thread(target=kill, daemon=True).start()
        times["start"] = time.perf_counter()
        outcome = fed.run(
            app,
            {
                "num-server-rounds": 2,
                "slow-partition": 2,
                "slow-seconds": 30.0,
                "round-timeout": 90.0,
                "out-dir": str(out),
            },
        )
    finally:
        fed.stop()
    result = json.loads((out / "smoke_result.json").read_text())
    event = next(line for line in outcome.output.splitlines() if "dropped out" in line)
    return {
        "status": outcome.status,
        "signal": "SIGTERM",
        "killed_after_s": round(times["killed"] - times["start"], 1),
        "run_wall_s": round(outcome.wall_s, 1),
        "rounds": [
            {"round": r["round"], "replies": r["replies"], "failed": len(r["failed"])}
            for r in result["rounds"]
        ],
        "event": event.strip(),
        "accuracy": result["accuracy"],
    }


def markdown(report: dict[str, Any]) -> str:
    """Markdown tables of the report."""
    lines = [
        "# Federated privacy and deployment",
        "",
        f"Command: `{report['command']}` on {report['machine']} (CPU shared with other jobs).",
        "",
        "## Epsilon after N rounds (Opacus RDP accountant, delta = 1e-5, unit = one hospital)",
        "",
        "![epsilon vs rounds](federated_epsilon.png)",
        "",
    ]
    table = report["epsilon"]
    keys = [k for k in table[0] if k.startswith("eps@")]
    lines.append("| hospitals per round | noise multiplier | " + " | ".join(keys) + " |")
    lines.append("|---|---|" + "---|" * len(keys))
    for row in table:
        cells = " | ".join(f"{row[k]:g}" for k in keys)
        lines.append(f"| {row['sampled']} | {row['noise_multiplier']} | {cells} |")
    if "deployment" in report:
        d = report["deployment"]
        lines += [
            "",
            "## Deployment engine: smoke app, SuperLink + 3 SuperNodes, TLS + node auth",
            "",
            "| rounds | status | start federation (s) | `flwr run` wall (s) | s/round | "
            "model bytes down/up per round (3 hospitals) | SuperLink traffic, whole run (bytes) |",
            "|---|---|---|---|---|---|---|",
            f"| {d['rounds']} | {d['status']} | {d['start_federation_s']} | "
            f"{d['flwr_run_wall_s']} | {d['s_per_round']} | {d['array_bytes_down_per_round']}"
            f" / {d['array_bytes_up_per_round']} | {d['superlink_traffic'].get('total-bytes')} |",
        ]
    if "dropout" in report:
        d = report["dropout"]
        rounds = "; ".join(
            f"round {r['round']}: {r['replies']} ok, {r['failed']} failed" for r in d["rounds"]
        )
        lines += [
            "",
            "## Dropout: one SuperNode stopped (SIGTERM) mid-round",
            "",
            f"- status {d['status']}, `flwr run` wall {d['run_wall_s']} s, killed "
            f"{d['killed_after_s']} s after submit; {rounds}",
            f"- logged: `{d['event'][:220]}`",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the parts and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-deploy", action="store_true", help="epsilon table only")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the deployment run")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "command": "python benchmarks/federated_deploy.py"
        + (" --skip-deploy" if args.skip_deploy else ""),
        "machine": f"{platform.machine()} {platform.system()}, 2 shared cores",
        "epsilon": epsilon_table(),
    }
    if not args.skip_deploy:
        with tempfile.TemporaryDirectory() as tmp:
            report["deployment"] = deployment(Path(tmp) / "deploy", args.rounds)
            report["dropout"] = dropout(Path(tmp) / "dropout")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_epsilon(RESULTS / "federated_epsilon.png")
    (RESULTS / "federated_deploy.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / "federated_deploy.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
