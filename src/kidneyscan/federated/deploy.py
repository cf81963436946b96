"""Deployment helpers: a SuperLink and SuperNodes as real processes, TLS material, node deadlines.

Used by ``scripts/deploy_local.sh``, the deployment tests and anyone who wants a loopback
federation from Python::

    with LocalFederation(workdir, num_nodes=3, tls=True, auth=True) as fed:
        fed.run(app_dir, {"num-server-rounds": 2})

Every process is started in its own session (process group), so :meth:`LocalFederation.stop`
also reaches the ``flwr-clientapp`` / ``flower-superexec`` / ``flwr-serverapp`` children that
Flower spawns and that can outlive their parent. Only those groups are signalled, by id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
MAKE_CERTS = REPO_ROOT / "scripts" / "make_certs.sh"


class NodesUnavailableError(RuntimeError):
    """Fewer SuperNodes than the minimum stayed connected for longer than the deadline."""


class DeploymentError(RuntimeError):
    """A SuperLink / SuperNode process or a ``flwr`` command failed."""


def _grid_base() -> type:
    from flwr.serverapp import Grid

    return Grid


class NodeDeadlineGrid(_grid_base()):  # type: ignore[misc]
    """A Grid that gives up when too few SuperNodes are connected for too long.

    Flower's strategies wait in ``sample_nodes`` with no time limit ("Waiting for nodes to
    connect") whenever fewer than ``min_available_nodes`` are online, at start-up or after
    hospitals drop out. They poll ``grid.get_node_ids()`` every second, so raising there ends the
    run with a clear error instead of hanging.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid handed to ``@app.main()``.
    min_nodes : int
        Minimum number of connected SuperNodes.
    timeout_s : float
        How long the count may stay below ``min_nodes`` before :class:`NodesUnavailableError`.
    """

    def __init__(self, grid: Any, min_nodes: int, timeout_s: float) -> None:
        if min_nodes < 1:
            raise ValueError(f"min_nodes must be >= 1, got {min_nodes}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.grid = grid
        self.min_nodes = int(min_nodes)
        self.timeout_s = float(timeout_s)
        self._short_since: float | None = None

    # -- the one method with behaviour ------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids; raises after ``timeout_s`` below ``min_nodes``."""
        ids = list(self.grid.get_node_ids())
        if len(ids) >= self.min_nodes:
            self._short_since = None
            return ids
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
            LOGGER.warning(
                "%d of the minimum %d SuperNodes connected; waiting up to %.0f s",
                len(ids),
                self.min_nodes,
                self.timeout_s,
            )
        elif now - self._short_since > self.timeout_s:
            raise NodesUnavailableError(
                f"only {len(ids)} of the minimum {self.min_nodes} SuperNodes were connected "
                f"for {self.timeout_s:.0f} s (node-timeout); check that every hospital's "
                "flower-supernode is running and can reach the SuperLink"
            )
        return ids

    # -- plain delegation -------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        """Delegate to the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """Run of the wrapped grid."""
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        """Delegate to the wrapped grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_nodes(self):  # type: ignore[no-untyped-def]
        """Delegate to the wrapped grid."""
        return self.grid.get_nodes()

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        """Delegate to the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        """Delegate to the wrapped grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        """Delegate to the wrapped grid."""
        return self.grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        # Anything else a Grid implementation offers (only called for missing attributes).
        if name == "grid":
            raise AttributeError(name)
        return getattr(self.grid, name)


def wait_for_nodes(grid: Any, min_nodes: int, timeout_s: float, poll_s: float = 1.0) -> list[int]:
    """Block until ``min_nodes`` SuperNodes are connected, or raise after ``timeout_s``.

    Raises
    ------
    NodesUnavailableError
        When the deadline passes first; the message says how many connected.
    """
    guarded = NodeDeadlineGrid(grid, min_nodes, timeout_s)
    while True:
        ids = list(guarded.get_node_ids())
        if len(ids) >= min_nodes:
            return ids
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------
# TLS and node keys
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """Paths of the TLS material and SuperNode keys made by ``scripts/make_certs.sh``."""

    directory: Path
    num_node_keys: int = 0

    @property
    def ca_cert(self) -> Path:
        """CA certificate: SuperNodes' ``--root-certificates``, connection ``root-certificates``."""
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        """SuperLink ``--ssl-certfile``."""
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        """SuperLink ``--ssl-keyfile``."""
        return self.directory / "server.key"

    def node_key(self, index: int) -> Path:
        """Private ECDSA key of SuperNode ``index`` (``--auth-supernode-private-key``)."""
        return self.directory / f"node-{index}"

    def node_public_key(self, index: int) -> Path:
        """Public key of SuperNode ``index`` (``flwr supernode register``)."""
        return self.directory / f"node-{index}.pub"


def make_certs(
    out_dir: str | Path,
    server_names: Sequence[str] = ("localhost", "127.0.0.1"),
    num_node_keys: int = 0,
    script: str | Path | None = None,
) -> Credentials:
    """Run ``scripts/make_certs.sh`` (openssl + ssh-keygen) and return the paths.

    Raises
    ------
    DeploymentError
        When the script is missing or fails (its stderr is in the message).
    """
    script = Path(script) if script is not None else MAKE_CERTS
    if not script.is_file():
        raise DeploymentError(f"certificate script not found: {script}")
    proc = subprocess.run(
        ["bash", str(script), str(out_dir), ",".join(server_names), str(num_node_keys)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise DeploymentError(f"{script.name} failed ({proc.returncode}): {proc.stderr.strip()}")
    return Credentials(Path(out_dir), num_node_keys)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"process {proc.pid} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise DeploymentError(f"nothing listening on {host}:{port} after {timeout_s:.0f} s")


@dataclass
class ManagedProcess:
    """One process started by :class:`LocalFederation`, leader of its own process group."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        """Process id (also the process-group id)."""
        return int(self.popen.pid)

    def alive(self) -> bool:
        """Whether the leader process is still running."""
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (leader and Flower's children)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _node_config(values: Mapping[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        parts.append(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}")
    return " ".join(parts)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


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
            f"default = {_toml_value(self.connection)}",
            "",
            f"[superlink.{self.connection}]",
            f"address = {_toml_value(f'127.0.0.1:{self.port}')}",
        ]
        if self.credentials is not None:
            lines.append(f"root-certificates = {_toml_value(str(self.credentials.ca_cert))}")
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
        _wait_port("127.0.0.1", self.port, wait_s, self.superlink.popen)
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
            _node_config(config),
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
            overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
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


def group_members(pgid: int) -> list[int]:
    """Pids still alive in process group ``pgid`` (Linux ``/proc``; empty elsewhere)."""
    members: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return members
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the ")" that closes the command name: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def which(tool: str) -> str | None:
    """``shutil.which`` that also looks next to this interpreter."""
    return shutil.which(tool, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


SMOKE_APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "kidneyscan-smoke"
version = "0.1.0"
description = "Seconds-long check of a KidneyScan federation (kidneyscan.federated.smoke)"
license = "Apache-2.0"
dependencies = ["flwr>=1.42", "numpy"]

[tool.flwr.app]
publisher = "kidneyscan"

[tool.flwr.app.components]
serverapp = "kidneyscan.federated.smoke:server_app"
clientapp = "kidneyscan.federated.smoke:client_app"

[tool.flwr.app.config]
num-server-rounds = 2
min-clients = 2
node-timeout = 60.0
round-timeout = 120.0
local-epochs = 5
lr = 0.5
seed = 0
out-dir = ""
fail-partition = -1
slow-partition = -1
slow-seconds = 0.0
dp = "none"
dp-noise-multiplier = 1.0
dp-clipping-norm = 1.0
dp-delta = 1e-5
dp-epsilon-budget = 0.0
num-clients = 3
"""


def write_smoke_app(app_dir: str | Path, secagg: bool = False) -> Path:
    """Write a Flower app directory whose components are :mod:`kidneyscan.federated.smoke`.

    With ``secagg`` the components are the smoke model under SecAgg+
    (:mod:`kidneyscan.federated.secagg`). The app code itself is imported from the installed
    ``kidneyscan`` package on every SuperNode (``PYTHONPATH`` or ``pip install``), so the FAB
    holds only ``pyproject.toml``.
    """
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    text = SMOKE_APP_PYPROJECT
    if secagg:
        text = text.replace("smoke:server_app", "secagg:server_app")
        text = text.replace("smoke:client_app", "secagg:client_app")
        text += "fail-round = 0\n" + _secagg_config_lines()
    (app_dir / "pyproject.toml").write_text(text)
    return app_dir


def _secagg_config_lines() -> str:
    from kidneyscan.federated.secagg import DEFAULTS

    skip = {"num-server-rounds", "min-clients", "node-timeout"}
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in DEFAULTS.items() if k not in skip)


def write_kidneyscan_secagg_app(app_dir: str | Path) -> Path:
    """App directory training the KidneyScan model under SecAgg+ (``secagg.kidneyscan_*``).

    Its run config is KidneyScan's (``federated.task.DEFAULTS``) plus the SecAgg+ keys.
    """
    from kidneyscan.federated import task

    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    head = SMOKE_APP_PYPROJECT.split("[tool.flwr.app.config]")[0]
    head = head.replace('name = "kidneyscan-smoke"', 'name = "kidneyscan-secagg"')
    head = head.replace("smoke:server_app", "secagg:kidneyscan_server_app")
    head = head.replace("smoke:client_app", "secagg:kidneyscan_client_app")
    config = dict(task.DEFAULTS) | {"node-timeout": 300.0}
    lines = "".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items())
    (app_dir / "pyproject.toml").write_text(
        head + "[tool.flwr.app.config]\n" + lines + _secagg_config_lines()
    )
    return app_dir


def _parse_run_config(text: str) -> dict[str, Any]:
    """``"key=value key2='text'"`` -> dict, with TOML value syntax (as ``flwr run -c``)."""
    import shlex
    import tomllib

    config: dict[str, Any] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"run-config entry {item!r} is not key=value")
        try:
            config[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            config[key] = value  # bare words are strings
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Loopback deployment: SuperLink + SuperNodes (+ TLS, node auth), ``flwr run``, stop all.

    Exit code 0 when the run completed, 1 when it failed (its reason is printed), 2 on bad
    arguments, 3 when the federation could not be started.
    """
    import argparse

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
        run_config = _parse_run_config(args.run_config)
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
    src = str(Path(__file__).resolve().parents[2])
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


if __name__ == "__main__":
    sys.exit(main())
