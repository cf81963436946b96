"""Flower app directories (a ``pyproject.toml`` only) for the smoke and SecAgg+ components.

The app code itself is imported from the installed ``kidneyscan`` package on every SuperNode
(``PYTHONPATH`` or ``pip install``), so the FAB holds only ``pyproject.toml``.
"""

from __future__ import annotations

from pathlib import Path

from kidneyscan.federated import secagg, task
from kidneyscan.federated.deploy.config import toml_value

#: Components of each app kind, looked up by ``flwr run`` on every SuperNode.
SMOKE_COMPONENTS = ("kidneyscan.testing.smoke:server_app", "kidneyscan.testing.smoke:client_app")
SMOKE_SECAGG_COMPONENTS = (
    "kidneyscan.testing.secagg_smoke:server_app",
    "kidneyscan.testing.secagg_smoke:client_app",
)
KIDNEYSCAN_SECAGG_COMPONENTS = (
    "kidneyscan.federated.secagg_app:server_app",
    "kidneyscan.federated.secagg_app:client_app",
)

# str.format template: its only braces are the two component fields.
_SMOKE_APP_TEMPLATE = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "kidneyscan-smoke"
version = "0.1.0"
description = "Seconds-long check of a KidneyScan federation (kidneyscan.testing.smoke)"
license = "Apache-2.0"
dependencies = ["flwr>=1.42", "numpy"]

[tool.flwr.app]
publisher = "kidneyscan"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

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
SMOKE_APP_PYPROJECT = _SMOKE_APP_TEMPLATE.format(
    serverapp=SMOKE_COMPONENTS[0], clientapp=SMOKE_COMPONENTS[1]
)


def write_smoke_app(app_dir: str | Path, secagg: bool = False) -> Path:
    """Write a Flower app directory whose components are :mod:`kidneyscan.testing.smoke`.

    With ``secagg`` the components are the smoke model under SecAgg+
    (:mod:`kidneyscan.testing.secagg_smoke`).
    """
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    text = SMOKE_APP_PYPROJECT
    if secagg:
        server, client = SMOKE_SECAGG_COMPONENTS
        text = _SMOKE_APP_TEMPLATE.format(serverapp=server, clientapp=client)
        text += "fail-round = 0\n" + _secagg_config_lines()
    (app_dir / "pyproject.toml").write_text(text)
    return app_dir


def _secagg_config_lines() -> str:
    # The shared keys are already in the smoke config above.
    skip = {"num-server-rounds", "min-clients", "node-timeout"}
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in secagg.DEFAULTS.items() if k not in skip)


def write_kidneyscan_secagg_app(app_dir: str | Path) -> Path:
    """App directory training the KidneyScan model under SecAgg+ (:mod:`.secagg_app`).

    Its run config is KidneyScan's (``federated.task.DEFAULTS``) plus the SecAgg+ keys.
    """
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    server, client = KIDNEYSCAN_SECAGG_COMPONENTS
    head = _SMOKE_APP_TEMPLATE.format(serverapp=server, clientapp=client)
    head = head.split("[tool.flwr.app.config]")[0]
    head = head.replace('name = "kidneyscan-smoke"', 'name = "kidneyscan-secagg"')
    config = dict(task.DEFAULTS) | {"node-timeout": 300.0}
    lines = "".join(f"{k} = {toml_value(v)}\n" for k, v in config.items())
    (app_dir / "pyproject.toml").write_text(
        head + "[tool.flwr.app.config]\n" + lines + _secagg_config_lines()
    )
    return app_dir
