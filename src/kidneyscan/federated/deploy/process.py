"""Processes in their own process groups: start, signal the whole group, find what is left.

Flower spawns ``flwr-clientapp`` / ``flower-superexec`` / ``flwr-serverapp`` children that can
outlive their parent, so every process is a session leader and is signalled by group id.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kidneyscan.federated.deploy.errors import DeploymentError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen) -> None:
    """Wait until ``host:port`` accepts connections; raise if ``proc`` exits or time runs out."""
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
