"""``python -m kidneyscan.federated.deploy``: a loopback deployment from the command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kidneyscan.federated.deploy.apps import write_kidneyscan_secagg_app, write_smoke_app
from kidneyscan.federated.deploy.config import parse_run_config
from kidneyscan.federated.deploy.errors import DeploymentError
from kidneyscan.federated.deploy.federation import LocalFederation


def main(argv: Sequence[str] | None = None) -> int:
    """Loopback deployment: SuperLink + SuperNodes (+ TLS, node auth), ``flwr run``, stop all.

    Exit code 0 when the run completed, 1 when it failed (its reason is printed), 2 on bad
    arguments, 3 when the federation could not be started.
    """
    parser = argparse.ArgumentParser(
        prog="python -m kidneyscan.federated.deploy",
        description="Run a Flower app on a local SuperLink + SuperNodes, then stop every process.",
    )
    parser.add_argument("--app", default=".", help="Flower app directory (default: repo root)")
    parser.add_argument(
        "--smoke", action="store_true", help="use the seconds-long smoke app instead of --app"
    )
    parser.add_argument(
        "--secagg",
        action="store_true",
        help="secure aggregation (SecAgg+): the KidneyScan model, or the smoke one with --smoke",
    )
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (hospitals)")
    parser.add_argument(
        "--data-dir",
        action="append",
        default=[],
        help="local image folder of one hospital (repeat once per node; sets node-config "
        "data-dir); without it nodes get partition-id / num-partitions",
    )
    parser.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication (ECDSA)")
    parser.add_argument("--workdir", default="runs/deploy", help="logs, certs, FLWR_HOME")
    parser.add_argument(
        "--run-config", default="", help="overrides, e.g. \"num-server-rounds=2 dp='server-fixed'\""
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="max seconds for the run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    if args.data_dir and len(args.data_dir) != args.nodes:
        parser.error(f"{len(args.data_dir)} --data-dir for {args.nodes} nodes")
    if args.auth and args.insecure:
        parser.error("--auth needs TLS: drop --insecure")
    for folder in args.data_dir:
        if not Path(folder).is_dir():
            parser.error(f"--data-dir {folder} is not a folder")
    try:
        run_config = parse_run_config(args.run_config)
    except ValueError as err:
        parser.error(str(err))
    workdir = Path(args.workdir).resolve()
    if args.smoke:
        app = write_smoke_app(workdir / "smoke_app", secagg=args.secagg)
    elif args.secagg:
        app = write_kidneyscan_secagg_app(workdir / "secagg_app")
    else:
        app = Path(args.app).resolve()
    if not (app / "pyproject.toml").is_file():
        parser.error(f"{app} has no pyproject.toml: not a Flower app directory")
    node_configs = (
        [{"data-dir": str(Path(d).resolve())} for d in args.data_dir] if args.data_dir else None
    )
    # src/kidneyscan/federated/deploy/cli.py -> src/, so SuperNodes import this checkout.
    src = str(Path(__file__).resolve().parents[3])
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH", "")]))}
    fed = LocalFederation(
        workdir,
        num_nodes=args.nodes,
        tls=not args.insecure,
        auth=args.auth,
        node_configs=node_configs,
        env=env,
    )
    try:
        try:
            fed.start()
        except DeploymentError as err:
            print(f"could not start the federation: {err}", file=sys.stderr)
            return 3
        print(f"SuperLink 127.0.0.1:{fed.port} (pid {fed.superlink.pid if fed.superlink else '?'})")
        for node in fed.nodes:
            print(f"{node.name}: pid {node.pid}, log {node.log_path}")
        outcome = fed.run(app, run_config, timeout_s=args.timeout)
        print(outcome.output)
        print(f"run {outcome.run_id}: {outcome.status} in {outcome.wall_s:.1f} s")
        if outcome.traffic:
            print(f"network traffic: {outcome.traffic}")
        if not outcome.ok:
            print(f"run failed: {outcome.details}", file=sys.stderr)
            return 1
        return 0
    finally:
        left = fed.stop()
        print("all processes stopped" if not left else f"still alive: {left}")
