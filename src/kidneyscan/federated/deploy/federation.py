"""A loopback federation: one SuperLink and N SuperNodes as real processes, then ``flwr run``.

::

    with LocalFederation(workdir, num_nodes=3, tls=True, auth=True) as fed:
        fed.run(app_dir, {"num-server-rounds": 2})
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kidneyscan.federated.deploy.config import node_config, toml_value
from kidneyscan.federated.deploy.errors import DeploymentError
from kidneyscan.federated.deploy.process import (
    ManagedProcess,
    free_port,
    group_members,
    wait_port,
)
from kidneyscan.federated.deploy.tls import Credentials, make_certs

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """What a ``flwr run`` on a :class:`LocalFederation` ended with."""

    run_id: str
    status: str
    details: str
    output: str
    wall_s: float
    traffic: dict[str, Any]

    @property
    def ok(self) -> bool:
        """Whether the run finished and completed (``finished:completed``)."""
        return self.status == "finished:completed"


@dataclass
class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, each in its own process group.

    Parameters
    ----------
    workdir : Path
        Logs, ``FLWR_HOME``, the SuperLink database and (with ``tls``) certificates go here.
    num_nodes : int
        Number of SuperNodes ("hospitals").
    tls : bool
        Serve the SuperLink over TLS with certificates from ``scripts/make_certs.sh``.
    auth : bool
        Enable SuperNode authentication (needs ``tls``): one ECDSA key per node, registered
        with ``flwr supernode register`` before the node starts.
    node_configs : list of mapping, optional
        ``--node-config`` of each node; default ``partition-id=i num-partitions=num_nodes``.
    bin_dir : Path, optional
        Folder with ``flower-superlink``, ``flower-supernode``, ``flwr``; default: this
        interpreter's ``bin``.
    env : mapping, optional
        Extra environment for every process (e.g. ``PYTHONPATH``).
    """

    workdir: Path
    num_nodes: int = 3
    tls: bool = True
    auth: bool = False
    node_configs: list[dict[str, Any]] | None = None
    bin_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    connection: str = "kidneyscan-local"

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication requires TLS (tls=True)")
        if self.node_configs is not None and len(self.node_configs) != self.num_nodes:
            raise ValueError(
                f"{len(self.node_configs)} node configs for {self.num_nodes} SuperNodes"
            )
        self.bin_dir = Path(self.bin_dir) if self.bin_dir else Path(sys.executable).parent
        for tool in ("flower-superlink", "flower-supernode", "flwr"):
            if not (self.bin_dir / tool).exists():
                raise DeploymentError(f"{tool} not found in {self.bin_dir}")
        self.superlink: ManagedProcess | None = None
        self.nodes: list[ManagedProcess] = []
        self.extra_nodes: list[ManagedProcess] = []
        self.port = 0
        self.credentials: Credentials | None = None

    # -- environment ------------------------------------------------------------------------
    @property
    def flwr_home(self) -> Path:
        """``FLWR_HOME`` of this federation (nothing goes to ``~/.flwr``)."""
        return self.workdir / "flwr_home"

    def environ(self) -> dict[str, str]:
        """Environment of every process: venv bin first on PATH, no telemetry, no installs."""
        env = dict(os.environ)
        env.update(
            {
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_TELEMETRY_ENABLED": "0",
                "PATH": f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env)
        return env

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            popen = subprocess.Popen(  # noqa: S603 - argv built here, no shell
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environ(),
                cwd=self.workdir,
                start_new_session=True,
            )
        LOGGER.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
        return ManagedProcess(name, popen, log_path)

    def write_connection(self) -> Path:
        """Write ``$FLWR_HOME/config.toml`` with this federation's SuperLink connection."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f"default = {toml_value(self.connection)}",
            "",
            f"[superlink.{self.connection}]",
            f"address = {toml_value(f'127.0.0.1:{self.port}')}",
        ]
        if self.credentials is not None:
            lines.append(f"root-certificates = {toml_value(str(self.credentials.ca_cert))}")
        else:
            lines.append("insecure = true")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, wait_s: float = 60.0) -> LocalFederation:
        """Start the SuperLink, register node keys (``auth``) and start the SuperNodes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        assert self.bin_dir is not None
        if self.tls:
            self.credentials = make_certs(
                self.workdir / "certs", num_node_keys=self.num_nodes if self.auth else 0
            )
        self.port = free_port()
        argv = [
            str(self.bin_dir / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.workdir / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        if self.credentials is not None:
            c = self.credentials
            argv += ["--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert)]
            argv += ["--ssl-keyfile", str(c.server_key)]
        else:
            argv.append("--insecure")
        if self.auth:
            argv.append("--enable-supernode-auth")
        self.superlink = self._spawn("superlink", argv)
        wait_port("127.0.0.1", self.port, wait_s, self.superlink.popen)
        self.write_connection()
        if self.auth:
            assert self.credentials is not None
            for i in range(self.num_nodes):
                self.flwr("supernode", "register", str(self.credentials.node_public_key(i)))
        self.nodes = [self.start_node(i) for i in range(self.num_nodes)]
        return self

    def start_node(self, index: int) -> ManagedProcess:
        """Start SuperNode ``index`` (one beyond ``num_nodes`` is still stopped by ``stop``)."""
        assert self.bin_dir is not None
        config = (
            self.node_configs[index]
            if self.node_configs is not None
            else {"partition-id": index, "num-partitions": self.num_nodes}
        )
        argv = [
            str(self.bin_dir / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--node-config",
            node_config(config),
            "--max-wait-time",
            "60",
        ]
        if self.credentials is not None:
            argv += ["--root-certificates", str(self.credentials.ca_cert)]
        else:
            argv.append("--insecure")
        if self.auth:
            assert self.credentials is not None
            argv += ["--auth-supernode-private-key", str(self.credentials.node_key(index))]
        proc = self._spawn(f"supernode-{index}", argv)
        if self.nodes and index >= len(self.nodes):
            self.extra_nodes.append(proc)
        return proc

    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this federation's connection."""
        assert self.bin_dir is not None
        argv = [str(self.bin_dir / "flwr"), *args]
        if args[:2] in {("supernode", "register"), ("supernode", "list")} or args[:1] in {
            ("ls",),
            ("stop",),
        }:
            argv.append(self.connection)
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=self.environ(),
            cwd=self.workdir,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed ({proc.returncode}): "
                f"{(proc.stdout + proc.stderr).strip()[-2000:]}"
            )
        return proc

    def run(
        self,
        app_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        timeout_s: float = 600.0,
    ) -> RunOutcome:
        """``flwr run APP_DIR CONNECTION --stream`` with run-config overrides, then its status.

        ``flwr run`` itself exits 0 even when the ServerApp fails, so the run's final status is
        read back with ``flwr ls --run-id``. Output is kept in ``logs/flwr-run-<run id>.log``.

        Raises
        ------
        DeploymentError
            When ``flwr run`` could not submit the run.
        """
        assert self.bin_dir is not None
        argv = [str(self.bin_dir / "flwr"), "run", str(app_dir), self.connection, "--stream"]
        if run_config:
            overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
            argv += ["--run-config", overrides]
        LOGGER.info("flwr run: %s", " ".join(argv))
        t0 = time.perf_counter()
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=self.environ(),
            cwd=self.workdir,
            timeout=timeout_s,
            check=False,
        )
        wall = time.perf_counter() - t0
        output = proc.stdout + proc.stderr
        found = re.search(r"started run (\d+)", output)
        if proc.returncode != 0 or found is None:
            raise DeploymentError(f"`flwr run` failed ({proc.returncode}): {output[-2000:]}")
        run_id = found.group(1)
        (self.workdir / "logs" / f"flwr-run-{run_id}.log").write_text(output)
        listing = json.loads(self.flwr("ls", "--run-id", run_id, "--format", "json").stdout)
        info = listing["runs"][0]
        return RunOutcome(
            run_id=run_id,
            status=str(info.get("status", "")),
            details=str(info.get("status-details", "")),
            output=output,
            wall_s=wall,
            traffic=dict(info.get("network-traffic", {})),
        )

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """SIGTERM every process group started here, SIGKILL what is left after ``grace_s``.

        Returns
        -------
        list of int
            Pids still alive in those groups 5 s after SIGKILL (empty when all are gone).
        """
        procs = [*self.nodes, *self.extra_nodes, *([self.superlink] if self.superlink else [])]
        for proc in procs:
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for proc in procs:
            # The group may still hold orphaned children even when the leader has exited.
            proc.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
        deadline = time.monotonic() + 5.0
        left = [pid for proc in procs for pid in group_members(proc.pid)]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [pid for proc in procs for pid in group_members(proc.pid)]
        if left:
            LOGGER.warning("processes still alive after stop: %s", left)
        return left

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
