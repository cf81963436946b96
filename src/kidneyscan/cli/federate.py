"""``kidneyscan federate``: a whole federation of simulated hospitals on this machine."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from kidneyscan.cli._app import app


class StrategyName(StrEnum):
    """Aggregation strategies (Flower's)."""

    fedavg = "fedavg"
    fedavgm = "fedavgm"
    fedprox = "fedprox"
    fedadam = "fedadam"
    fedyogi = "fedyogi"
    fedmedian = "fedmedian"
    fedtrimmedavg = "fedtrimmedavg"
    krum = "krum"


class Partitioning(StrEnum):
    """How the training images are split between hospitals."""

    iid = "iid"
    dirichlet = "dirichlet"
    site = "site"
    bands = "bands"


@app.command()
def federate(
    data: Path | None = typer.Option(
        None, "--data", help="Dataset folder (CT-KIDNEY / ImageFolder layout).", file_okay=False
    ),
    phantom: bool = typer.Option(
        False, "--phantom", help="Generate phantom hospitals (one site per client) and use them."
    ),
    phantom_images: int = typer.Option(
        240, "--phantom-images", min=16, help="Number of phantom images to generate."
    ),
    clients: int = typer.Option(3, "--clients", min=1, help="Number of hospitals (clients)."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Federated rounds."),
    strategy: StrategyName = typer.Option(
        StrategyName.fedavg, "--strategy", help="Aggregation strategy."
    ),
    partitioning: Partitioning = typer.Option(
        Partitioning.dirichlet,
        "--partitioning",
        help="iid, dirichlet (label skew), site, or bands (by patient: contiguous index bands).",
    ),
    alpha: float = typer.Option(
        0.5, "--alpha", help="Dirichlet concentration; smaller = more label skew."
    ),
    min_samples: int = typer.Option(
        2, "--min-samples", min=1, help="Minimum training images per client (else an error)."
    ),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1, help="Local epochs per round."),
    model: str = typer.Option(
        "convnext_atto", "--model", help="Model name for the factory (e.g. hybrid, small_cnn)."
    ),
    model_kwargs: str = typer.Option(
        "{}",
        "--model-kwargs",
        help='Model options as JSON, e.g. \'{"backbone": "convnext_atto"}\'.',
    ),
    image_size: int = typer.Option(64, "--image-size", min=8, help="Input size in pixels."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Local batch size."),
    lr: float = typer.Option(1e-3, "--lr", help="Local AdamW learning rate."),
    lr_schedule: str = typer.Option(
        "constant",
        "--lr-schedule",
        help="constant (a fresh AdamW at --lr each round) or cosine (the central recipe's "
        "1-epoch warm-up and cosine decay, spread over rounds x local epochs).",
    ),
    optimizer_state: str = typer.Option(
        "fresh",
        "--optimizer-state",
        help="fresh (a new AdamW every round) or keep (each site keeps its AdamW moments and "
        "step count between rounds, in its own memory; nothing more is sent).",
    ),
    server_lr: float = typer.Option(
        0.01, "--server-lr", help="Server learning rate of FedAdam and FedYogi."
    ),
    server_tau: float = typer.Option(
        0.001, "--server-tau", help="Adaptivity (tau) of FedAdam and FedYogi."
    ),
    server_momentum: float = typer.Option(
        0.9, "--server-momentum", help="FedAvgM's server momentum in [0, 1) (fedavgm only)."
    ),
    fedavgm_server_lr: float = typer.Option(
        1.0, "--fedavgm-server-lr", help="FedAvgM's server learning rate (fedavgm only)."
    ),
    proximal_mu: float = typer.Option(
        0.01, "--proximal-mu", help="FedProx proximal term weight (fedprox only)."
    ),
    min_clients: int | None = typer.Option(
        None, "--min-clients", help="Clients needed per round (default: all)."
    ),
    attackers: int = typer.Option(
        0, "--assumed-attackers", min=0, help="Byzantine clients robust strategies must survive."
    ),
    local_val: float = typer.Option(
        0.15, "--local-val", help="Fraction of each site kept for federated validation."
    ),
    test_fraction: float = typer.Option(
        0.2, "--test-fraction", help="Fraction of images held out as the server's test set."
    ),
    fp16: bool = typer.Option(False, "--fp16", help="Send tensors as float16 (half the bytes)."),
    cache_features: bool = typer.Option(
        False,
        "--cache-features",
        help="Clients compute the frozen backbone features of their images once, on disk "
        "($KIDNEYSCAN_CACHE), and reuse them every local epoch, round and run (models with a "
        "frozen prefix only; no pixel augmentation, stored flipped views instead).",
    ),
    dp: str = typer.Option(
        "none", "--dp", help="Differential privacy: none, server-fixed, client-fixed, ..."
    ),
    dp_noise_multiplier: float = typer.Option(
        1.0, "--dp-noise-multiplier", help="DP: Gaussian noise std / clipping norm (sigma)."
    ),
    dp_clipping_norm: float = typer.Option(
        1.0, "--dp-clipping-norm", help="DP: L2 bound of each hospital's update."
    ),
    dp_delta: float = typer.Option(1e-5, "--dp-delta", help="DP: delta of the reported epsilon."),
    dp_epsilon_budget: float = typer.Option(
        0.0,
        "--dp-epsilon-budget",
        help="DP: stop before epsilon would exceed this (0: no budget, epsilon still reported).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for splits, partitions and models."),
    cpus_per_client: float = typer.Option(
        1.0, "--cpus-per-client", help="Ray CPUs per client (1 on a 2-core laptop)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the last global checkpoint in --out."
    ),
    out: Path = typer.Option(Path("runs/federated"), "--out", help="Run folder."),
    verbose: bool = typer.Option(False, "--verbose", help="Flower's debug logging."),
) -> None:
    """Federated training across simulated hospitals with Flower's simulation engine.

    Writes OUT/checkpoint/ (same format as `kidneyscan train`), curves.png/json,
    metrics.json, federation.json, report.md, partitions.csv and test.csv.
    """
    from rich.console import Console
    from rich.table import Table

    from kidneyscan.data.datasets import DataError, scan_dataset
    from kidneyscan.federated import task
    from kidneyscan.federated.simulation import prepare_run, simulate
    from kidneyscan.federated.strategies import StrategyError

    console = Console()
    if (data is None) == (not phantom):
        raise typer.BadParameter("give exactly one of --data DIR or --phantom")
    try:
        if phantom:
            from kidneyscan.data.phantom import generate_dataset

            data = out / "phantom"
            if not data.is_dir():
                console.print(f"generating {phantom_images} phantom images in {data} ...")
                generate_dataset(
                    data,
                    n=phantom_images,
                    seed=seed,
                    sites=clients,
                    image_size=max(64, image_size),  # the phantom draws at >= 64 px
                    progress=True,
                )
        assert data is not None
        prepared: dict[str, Any]
        if resume and (out / "partitions.csv").is_file():
            prepared = {
                "partition-file": str((out / "partitions.csv").resolve()),
                "test-file": str((out / "test.csv").resolve()),
                "split-file": str((out / "split.csv").resolve()),
                "summary": [],
            }
        else:
            prepared = prepare_run(
                scan_dataset(data),
                out,
                num_clients=clients,
                partitioning=partitioning.value,
                alpha=alpha,
                min_samples=min_samples,
                test_fraction=test_fraction,
                local_val_fraction=local_val,
                seed=seed,
            )
        _print_partitions(console, Table, prepared["summary"])
        config = {
            "num-server-rounds": rounds,
            "local-epochs": local_epochs,
            "strategy": strategy.value,
            "partitioning": partitioning.value,
            "dirichlet-alpha": alpha,
            "min-samples": min_samples,
            "min-clients": min_clients or clients,
            "assumed-attackers": attackers,
            "proximal-mu": proximal_mu,
            "server-lr": server_lr,
            "server-tau": server_tau,
            "server-momentum": server_momentum,
            "fedavgm-server-lr": fedavgm_server_lr,
            "model": model,
            "model-kwargs": model_kwargs,
            "image-size": image_size,
            "batch-size": batch_size,
            "lr": lr,
            "lr-schedule": lr_schedule,
            "optimizer-state": optimizer_state,
            "local-val-fraction": local_val,
            "transport-fp16": fp16,
            "cache-features": cache_features,
            "seed": seed,
            "out-dir": str(out),
            "resume": resume,
            "partition-file": prepared["partition-file"],
            "test-file": prepared["test-file"],
            "split-file": prepared["split-file"],
            "num-clients": clients,
            "dp": dp,
            "dp-noise-multiplier": dp_noise_multiplier,
            "dp-clipping-norm": dp_clipping_norm,
            "dp-delta": dp_delta,
            "dp-epsilon-budget": dp_epsilon_budget,
        }
        summary = simulate(
            config, num_clients=clients, cpus_per_client=cpus_per_client, verbose=verbose
        )
    except (DataError, StrategyError, task.FederatedConfigError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    best = summary.get("best") or {}
    console.print(
        f"done: {summary['completed_round']} round(s) in {summary.get('wall_seconds', 0):.1f} s; "
        f"selected round {best.get('round')} (test accuracy {best.get('test-accuracy', 0):.3f}, "
        f"test macro-F1 {best.get('test-macro-f1', 0):.3f}); checkpoint in {out / 'checkpoint'}"
    )
    if summary.get("stopped_reason"):
        console.print(f"[yellow]stopped early:[/yellow] {summary['stopped_reason']}")


def _print_partitions(console: object, table_cls: type, summary: list[dict]) -> None:
    if not summary:
        return
    table = table_cls(title="Hospitals (training images)")
    table.add_column("client")
    classes = list(summary[0]["per_class"])
    for c in classes:
        table.add_column(c, justify="right")
    table.add_column("total", justify="right")
    for row in summary:
        table.add_row(
            str(row["partition"]), *(str(row["per_class"][c]) for c in classes), str(row["n"])
        )
    console.print(table)  # type: ignore[attr-defined]
