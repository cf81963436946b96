"""Run a whole federation on one machine with Flower's simulation engine.

:func:`prepare_run` does what the hospitals' IT would do in a real deployment: it splits off a
held-out test set for the server and partitions the rest into per-hospital training sets,
written as CSV files under the run folder (for audit). :func:`simulate` then starts one
virtual SuperNode per hospital; each ClientApp reads only its own rows of the partition file.
Used by ``kidneyscan federate``, ``kidneyscan demo`` and ``benchmarks/federated.py``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from kidneyscan.data.datasets import Sample, scan_dataset
from kidneyscan.data.partition import partition_samples, partition_summary, save_partitions
from kidneyscan.data.phantom import generate_dataset
from kidneyscan.data.splits import Split, make_split, save_split
from kidneyscan.federated import logs, task
from kidneyscan.federated.client_app import app as client_app
from kidneyscan.federated.server_app import app as server_app

log = logging.getLogger(__name__)


def split_test(
    samples: Sequence[Sample], test_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], Any]:
    """Split off the server's held-out test set: ``(train_pool, test, split)``.

    Uses the leakage-aware :func:`kidneyscan.data.splits.make_split`: one patient's slices,
    neighbouring slices and near-duplicates stay on one side.
    """
    if not 0.0 < test_fraction < 1.0:
        raise task.FederatedConfigError(f"test fraction must be in (0, 1), got {test_fraction}")
    parts = make_split(list(samples), val=0.0, test=test_fraction, seed=seed)
    pool, test = list(parts["train"]) + list(parts.get("val", [])), list(parts["test"])
    return pool, test, parts


def prepare_run(
    samples: Sequence[Sample],
    out_dir: str | Path,
    *,
    num_clients: int,
    partitioning: str = "dirichlet",
    alpha: float = 0.5,
    min_samples: int = 2,
    test_fraction: float = 0.2,
    local_val_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``partitions.csv`` (clients' training rows) and ``test.csv`` (server) to ``out_dir``.

    Also writes ``split.csv`` in the project's split format: ``train`` / ``val`` (the sites'
    local hold-outs for ``local_val_fraction`` and ``seed``, as the ClientApps draw them) /
    ``test``.

    Returns
    -------
    dict
        Run-config entries to pass on: ``partition-file``, ``test-file``, ``split-file``,
        ``num-clients``,
        plus ``summary`` (per-client counts) for display.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    pool, test, split = split_test(samples, test_fraction, seed)
    parts = partition_samples(
        pool, num_clients, scheme=partitioning, alpha=alpha, min_samples=min_samples, seed=seed
    )
    # The standard split CSV (train / val = the sites' local hold-outs / test), so
    # `kidneyscan evaluate --split` scores the same test images.
    train: list[Sample] = []
    val: list[Sample] = []
    for part in parts:
        t, v = task.split_local(part, local_val_fraction, seed)
        train += t
        val += v
    save_split(
        Split({"train": train, "val": val, "test": test}, split.groups, split.info),
        out / "split.csv",
    )
    part_file = save_partitions(parts, out / "partitions.csv")
    test_file = save_partitions([test], out / "test.csv")
    summary = partition_summary(parts)
    (out / "partitions.json").write_text(json.dumps(summary, indent=2))
    return {
        "partition-file": str(part_file.resolve()),
        "test-file": str(test_file.resolve()),
        "split-file": str((out / "split.csv").resolve()),
        "num-clients": num_clients,
        "summary": summary,
        "n_test": len(test),
    }


def _prepare_env(flwr_home: Path) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_HOME", str(flwr_home))
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def simulate(
    config: Mapping[str, Any],
    *,
    num_clients: int,
    cpus_per_client: float = 1.0,
    total_cpus: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the ServerApp and ``num_clients`` ClientApps in Flower's simulation engine.

    Parameters
    ----------
    config
        Run-config overrides (kebab-case keys of :data:`task.DEFAULTS`, plus privacy keys);
        must include ``out-dir`` and normally ``partition-file`` / ``test-file``.
    num_clients
        Virtual SuperNodes (hospitals), one partition each.
    cpus_per_client
        Ray resources per client; 1 lets two clients train at once on a 2-core machine
        (Flower's default of 2 runs them one by one).
    total_cpus
        CPUs Ray may use (default: all).
    verbose
        Flower's debug log on the console. Otherwise Flower's and the workers' lines go to
        ``<out-dir>/flower.log`` (:mod:`kidneyscan.federated.logs`) and the console shows one
        line per round.

    Returns
    -------
    dict
        The run's ``federation.json`` summary (rounds, best round, bytes, wall time).
    """
    cfg = dict(config)
    out = Path(str(cfg["out-dir"])).resolve()
    cfg["out-dir"] = str(out)
    cfg.setdefault("num-clients", num_clients)
    task.run_config(cfg)  # fail here, with a clear message, before Ray starts
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(json.dumps(cfg, indent=2, default=str))
    _prepare_env(out.parent / ".flwr")
    previous = os.environ.get(task.CONFIG_ENV)
    os.environ[task.CONFIG_ENV] = json.dumps(cfg, default=str)
    init_args: dict[str, Any] = {"num_cpus": total_cpus} if total_cpus else {}
    if not verbose:
        init_args["log_to_driver"] = False  # the workers log to flower.log themselves
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": float(cpus_per_client), "num_gpus": 0.0},
        "init_args": init_args,
    }
    try:
        with nullcontext() if verbose else logs.to_file(out / "flower.log"):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config=backend,  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
    finally:
        if previous is None:
            os.environ.pop(task.CONFIG_ENV, None)
        else:
            os.environ[task.CONFIG_ENV] = previous
    summary_file = out / "federation.json"
    if not summary_file.is_file():
        raise RuntimeError(
            f"the federated run ended without writing {summary_file}; see the log above"
        )
    result: dict[str, Any] = json.loads(summary_file.read_text())
    return result


#: The demo's model: the default hybrid (CT-pretrained ResNet-152, frozen, its layer3 tokens
#: through the Transformer head). Without the flipped view at test time each hospital extracts
#: one view per image, half the time of the default's two.
DEMO_MODEL_KWARGS: dict[str, Any] = {"flip_tta": False}

#: Side of the generated phantom: the public data's 512 px, the kidney band's resolution.
DEMO_PHANTOM_SIZE = 512

#: The demo's preprocessing (stored in the checkpoint, so the service crops the same way): the
#: kidney band with all but the kidneys masked. The phantom's band is mostly bowel and fat, and
#: with the plain band the demo stayed near chance (macro-F1 0.30 against 0.64; docs/federated.md).
DEMO_PREPROCESSING = [{"name": "crop_kidney_band_masked"}]


def demo_config(
    out: Path,
    prepared: Mapping[str, Any],
    *,
    rounds: int,
    local_epochs: int,
    seed: int,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The demo's run config: FedAvg of the default hybrid's trainable head on cached features
    (``model_kwargs``: hybrid options over the demo's own, e.g. ``{"token_drop": 0.75}``)."""
    sites = int(prepared["num-clients"])
    return {
        "strategy": "fedavg",
        "partitioning": "site",
        "num-server-rounds": rounds,
        "local-epochs": local_epochs,
        "min-clients": sites,
        "model": "hybrid",
        "model-kwargs": json.dumps({**DEMO_MODEL_KWARGS, **(model_kwargs or {})}),
        "image-size": 224,
        "preprocessing": json.dumps(DEMO_PREPROCESSING),
        "cache-features": True,
        "augment": False,
        # The central recipe's batch (32) split over the hospitals: each site then takes as many
        # optimiser steps per epoch as one central run would (measured on the real sample:
        # batch 32 per site left FedAvg under-trained at this budget, batch 11 did not).
        "batch-size": max(4, round(32 / sites)),
        "lr": 3e-4,
        "local-val-fraction": 0.15,
        "seed": seed,
        "out-dir": str(out),
        "partition-file": prepared["partition-file"],
        "test-file": prepared["test-file"],
        "split-file": prepared["split-file"],
        "num-clients": sites,
    }


def cache_site_features(cfg: Mapping[str, Any]) -> None:
    """What each hospital does once before the rounds: its frozen features into the cache.

    In a deployment every SuperNode does this on its own images the first time it trains; the
    simulation does it here, site by site with a progress bar, so the rounds only read the cache.
    The server's test images are cached the same way (the server evaluates the global model).
    """
    from kidneyscan.data.partition import load_partition
    from kidneyscan.models.frozen import FrozenSplit

    run = task.run_config(cfg)
    split = FrozenSplit(task.build_model(run))
    store = task.feature_store(split, run, task.build_preprocessor(run))
    parts = load_partition(str(cfg["partition-file"]))
    for i, part in enumerate(parts):
        store.load(part, progress=True, desc=f"hospital {i} features")
    test = load_partition(str(cfg["test-file"]))[0]
    store.load(test, progress=True, desc="server test features")


def demo_federated(
    out_dir: str | Path,
    *,
    n: int = 600,
    rounds: int = 8,
    local_epochs: int = 1,
    sites: int = 3,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Phantom hospitals -> federated training of the default hybrid's head -> report, checkpoint.

    The phantom goes to ``<out_dir>/data`` (one scanner profile per hospital, reused when
    already there with the same settings); each hospital is one site (``site`` partitioning:
    scanner shift and class mix differ between hospitals). Each hospital caches the frozen
    CT-backbone features of its images once (:func:`cache_site_features`); the rounds train
    the Transformer head on them. The selected global model is written to
    ``<out_dir>/checkpoint``, the report to ``<out_dir>/report.md``, Flower's log to
    ``<out_dir>/flower.log``. ``model_kwargs`` change the hybrid's options (the demo's own,
    :data:`DEMO_MODEL_KWARGS`, apply otherwise).

    Returns
    -------
    dict
        The ``federation.json`` summary.
    """
    out = Path(out_dir)
    data = out / "data"
    stamp = data / ".demo.json"
    want = {"n": n, "seed": seed, "sites": sites, "image_size": DEMO_PHANTOM_SIZE}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        generate_dataset(
            data, n, seed=seed, sites=sites, image_size=DEMO_PHANTOM_SIZE, progress=True
        )
        stamp.write_text(json.dumps(want))
    prepared = prepare_run(
        scan_dataset(data),
        out,
        num_clients=sites,
        partitioning="site",
        min_samples=4,
        test_fraction=0.2,
        local_val_fraction=0.15,
        seed=seed,
    )
    config = demo_config(
        out,
        prepared,
        rounds=rounds,
        local_epochs=local_epochs,
        seed=seed,
        model_kwargs=model_kwargs,
    )
    with logs.to_file(out / "flower.log"):  # model loading notes, cache messages
        cache_site_features(config)
    return simulate(config, num_clients=sites, total_cpus=demo_ray_cpus(sites))


def demo_ray_cpus(sites: int, cores: int | None = None) -> int:
    """Ray CPUs for the demo: at least one per hospital, so every hospital trains at once.

    Each client takes one Ray CPU and one thread. With fewer cores than hospitals (three on a
    2-core laptop) Ray would otherwise train two, then the third alone on one core while the
    other idles; declared one per hospital, the operating system shares the cores among all
    three and no core waits for the last one.
    """
    return max(sites, cores if cores is not None else (os.cpu_count() or 1))
