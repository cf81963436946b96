"""TLS certificates and SuperNode keys, made by ``scripts/make_certs.sh`` (openssl + ssh-keygen)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kidneyscan.federated.deploy.errors import DeploymentError

# src/kidneyscan/federated/deploy/tls.py -> the repository root holding scripts/.
REPO_ROOT = Path(__file__).resolve().parents[4]
MAKE_CERTS = REPO_ROOT / "scripts" / "make_certs.sh"


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
