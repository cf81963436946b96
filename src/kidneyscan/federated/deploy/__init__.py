"""Deployment helpers: a SuperLink and SuperNodes as real processes, TLS material, app folders.

Used by ``scripts/deploy_local.sh``, the deployment tests and anyone who wants a loopback
federation from Python::

    with LocalFederation(workdir, num_nodes=3, tls=True, auth=True) as fed:
        fed.run(app_dir, {"num-server-rounds": 2})

Every process is started in its own session (process group), so :meth:`LocalFederation.stop`
also reaches the ``flwr-clientapp`` / ``flower-superexec`` / ``flwr-serverapp`` children that
Flower spawns and that can outlive their parent. Only those groups are signalled, by id.

Modules: :mod:`.tls` (certificates, node keys), :mod:`.process` (process groups, ports),
:mod:`.federation` (:class:`LocalFederation`), :mod:`.apps` (``pyproject.toml`` of the smoke and
SecAgg+ apps), :mod:`.config` (TOML values, run-config strings), :mod:`.cli`
(``python -m kidneyscan.federated.deploy``). The node deadline lives one level down, in
:mod:`kidneyscan.federated.grid`, because the ServerApps use it too.
"""

from kidneyscan.federated.deploy.apps import (
    SMOKE_APP_PYPROJECT,
    write_kidneyscan_secagg_app,
    write_smoke_app,
)
from kidneyscan.federated.deploy.cli import main
from kidneyscan.federated.deploy.config import node_config, parse_run_config, toml_value
from kidneyscan.federated.deploy.errors import DeploymentError
from kidneyscan.federated.deploy.federation import LocalFederation, RunOutcome
from kidneyscan.federated.deploy.process import ManagedProcess, free_port, group_members, which
from kidneyscan.federated.deploy.tls import MAKE_CERTS, REPO_ROOT, Credentials, make_certs
from kidneyscan.federated.grid import NodeDeadlineGrid, NodesUnavailableError, wait_for_nodes

__all__ = [
    "MAKE_CERTS",
    "REPO_ROOT",
    "SMOKE_APP_PYPROJECT",
    "Credentials",
    "DeploymentError",
    "LocalFederation",
    "ManagedProcess",
    "NodeDeadlineGrid",
    "NodesUnavailableError",
    "RunOutcome",
    "free_port",
    "group_members",
    "main",
    "make_certs",
    "node_config",
    "parse_run_config",
    "toml_value",
    "wait_for_nodes",
    "which",
    "write_kidneyscan_secagg_app",
    "write_smoke_app",
]
