"""Deployment engine on loopback: certificates, SuperLink + 3 SuperNodes with TLS and node auth."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import kidneyscan
from kidneyscan.federated import deploy

SRC = str(Path(kidneyscan.__file__).resolve().parents[1])


def test_make_certs_script(tmp_path: Path) -> None:
    # Execute
    creds = deploy.make_certs(tmp_path / "certs", ("localhost", "127.0.0.1"), num_node_keys=2)

    # Assert: certificate chains to the CA, carries both names, node keys are ECDSA-384.
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(creds.ca_cert), str(creds.server_cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(creds.server_cert), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    for i in range(2):
        info = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(creds.node_public_key(i))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert info.startswith("384 ") and "(ECDSA)" in info
    assert oct(creds.server_key.stat().st_mode & 0o777) == "0o600"
    assert not creds.node_public_key(2).exists()


def test_make_certs_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(deploy.DeploymentError, match="NUM_NODE_KEYS"):
        deploy.make_certs(tmp_path, num_node_keys=-1)


@pytest.mark.parametrize("kind", ["smoke", "smoke-secagg", "kidneyscan-secagg"])
def test_app_directories_are_valid_flower_apps(tmp_path: Path, kind: str) -> None:
    import tomllib

    from flwr.common.config import validate_config

    if kind == "kidneyscan-secagg":
        app = deploy.write_kidneyscan_secagg_app(tmp_path)
    else:
        app = deploy.write_smoke_app(tmp_path, secagg=kind == "smoke-secagg")
    config = tomllib.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=str(app))
    assert ok, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert ("secagg-timeout" in run_config) == kind.endswith("secagg")


def test_run_config_parser() -> None:
    parsed = deploy.parse_run_config("num-server-rounds=3 dp='client-fixed' lr=0.5 x=word")
    assert parsed == {"num-server-rounds": 3, "dp": "client-fixed", "lr": 0.5, "x": "word"}
    with pytest.raises(ValueError, match="not key=value"):
        deploy.parse_run_config("rounds")


@pytest.mark.slow
def test_superlink_and_three_supernodes_tls_auth_two_rounds(tmp_path: Path) -> None:
    # Prepare
    app = deploy.write_smoke_app(tmp_path / "app")
    out = tmp_path / "out"
    fed = deploy.LocalFederation(
        tmp_path / "fed", num_nodes=3, tls=True, auth=True, env={"PYTHONPATH": SRC}
    )
    try:
        fed.start()

        # Execute
        outcome = fed.run(app, {"num-server-rounds": 2, "min-clients": 3, "out-dir": str(out)})

        # A key that was never registered is turned away by the SuperLink.
        assert fed.credentials is not None
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f"]
            + [str(fed.credentials.node_key(3))],
            check=True,
        )
        intruder = fed.start_node(3)
        intruder_rc = intruder.popen.wait(timeout=60)
    finally:
        leftovers = fed.stop()

    # Assert
    assert outcome.ok, outcome.details + outcome.output[-3000:]
    result = json.loads((out / "smoke_result.json").read_text())
    assert [(r["round"], r["replies"], r["failed"]) for r in result["rounds"]] == [
        (1, 3, []),
        (2, 3, []),
    ]
    assert result["accuracy"]["2"] > result["accuracy"]["0"] + 0.2
    assert all(r["bytes_received"] > 0 for r in result["rounds"])
    assert intruder_rc != 0 and "Failed to activate SuperNode" in intruder.log()
    # Every process group started (SuperLink, SuperNodes and their Flower children) is gone.
    assert leftovers == []
