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
from pathlib import Path
from typing import Any

from kidneyscan.data.datasets import Sample
from kidneyscan.federated import task

log = logging.getLogger(__name__)


def split_test(
    samples: Sequence[Sample], test_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split off the server's held-out test set: ``(train_pool, test)``.

    Uses the leakage-aware :func:`kidneyscan.data.splits.make_split` (neighbouring slices and
    near-duplicates stay on one side) when available.
    """
    if not 0.0 < test_fraction < 1.0:
        raise task.FederatedConfigError(f"test fraction must be in (0, 1), got {test_fraction}")
    try:
        from kidneyscan.data.splits import make_split
    except ImportError:
        make_split = None
    if make_split is not None:
        parts = make_split(list(samples), val=0.0, test=test_fraction, seed=seed)
        return list(parts["train"]) + list(parts.get("val", [])), list(parts["test"])
    from sklearn.model_selection import train_test_split

    log.warning("kidneyscan.data.splits not available: stratified split without grouping")
    train, test = train_test_split(
        list(samples),
        test_size=test_fraction,
        random_state=seed,
        stratify=[s.label for s in samples],
    )
    return list(train), list(test)


def prepare_run(
    samples: Sequence[Sample],
    out_dir: str | Path,
    *,
    num_clients: int,
    partitioning: str = "dirichlet",
    alpha: float = 0.5,
    min_samples: int = 2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``partitions.csv`` (clients' training rows) and ``test.csv`` (server) to ``out_dir``.

    Returns
    -------
    dict
        Run-config entries to pass on: ``partition-file``, ``test-file``, ``num-clients``,
        plus ``summary`` (per-client counts) for display.
    """
    from kidneyscan.data.partition import partition_samples, partition_summary, save_partitions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool, test = split_test(samples, test_fraction, seed)
    parts = partition_samples(
        pool, num_clients, scheme=partitioning, alpha=alpha, min_samples=min_samples, seed=seed
    )
    part_file = save_partitions(parts, out / "partitions.csv")
    test_file = save_partitions([test], out / "test.csv")
    summary = partition_summary(parts)
    (out / "partitions.json").write_text(json.dumps(summary, indent=2))
    return {
        "partition-file": str(part_file.resolve()),
        "test-file": str(test_file.resolve()),
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

    Returns
    -------
    dict
        The run's ``federation.json`` summary (rounds, best round, bytes, wall time).
    """
    from flwr.simulation import run_simulation

    from kidneyscan.federated.client_app import app as client_app
    from kidneyscan.federated.server_app import app as server_app

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
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": float(cpus_per_client), "num_gpus": 0.0},
        "init_args": {"num_cpus": total_cpus} if total_cpus else {},
    }
    try:
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
