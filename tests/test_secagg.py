"""SecAgg+ gives plain FedAvg's weighted mean (within quantisation), also when a client drops."""

from __future__ import annotations

import numpy as np
import pytest

from kidneyscan.federated import secagg, secagg_app
from kidneyscan.testing import secagg_smoke, smoke

pytestmark = pytest.mark.slow

NUM_CLIENTS = 4


def _fedavg(updates: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    total = sum(n for _, n in updates)
    return [sum(p[i] * (n / total) for p, n in updates) for i in range(len(updates[0][0]))]


def test_secagg_equals_fedavg_with_and_without_dropout() -> None:
    # Prepare: 4 hospitals, 2 rounds; partition 3 raises during training in round 2 only.
    from flwr.simulation import run_simulation

    overrides = {
        "num-server-rounds": 2,
        "min-clients": 3,
        "node-timeout": 60.0,
        "secagg-num-shares": 3,
        "secagg-threshold": 2,
        "secagg-timeout": 60.0,
        "local-epochs": 3,
        "fail-partition": 3,
        "fail-round": 2,
    }
    rounds: list[dict] = []
    server = secagg_smoke.make_server_app(overrides=overrides, on_round=rounds.append)
    client = secagg_smoke.make_client_app(overrides=overrides)

    # Execute
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )

    # Assert: recompute every client's update in the clear and average like FedAvg.
    assert [r["round"] for r in rounds] == [1, 2]
    assert (rounds[0]["results"], rounds[0]["failures"]) == (4, 0)
    assert rounds[1]["results"] == 3 and rounds[1]["failures"] >= 1
    config = smoke.merged_config({}, overrides)
    previous = list(smoke.initial_weights().values())
    for record, survivors in zip(rounds, (range(4), range(3)), strict=True):
        updates = [
            secagg_smoke.local_update(previous, pid, config, server_round=record["round"])[:2]
            for pid in survivors
        ]
        expected = _fedavg(updates)
        got = record["parameters"]
        # Quantisation step: 2 * clipping_range / quantization_range = 16 / 2**22 ~ 4e-6
        # per client and value; the average of 4 stays well inside 1e-4.
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, atol=1e-4, rtol=0)
        # ...and the updates were not trivially equal, so the weighting is really checked.
        unweighted = [np.mean([u[0][i] for u in updates], axis=0) for i in range(2)]
        assert max(np.abs(g - u).max() for g, u in zip(got, unweighted, strict=True)) > 1e-3
        previous = got


def test_secagg_settings_reject_impossible_threshold() -> None:
    with pytest.raises(ValueError, match="secagg-threshold"):
        secagg.secagg_settings({"secagg-num-shares": 3, "secagg-threshold": 4}, num_clients=4)
    with pytest.raises(ValueError, match="exceeds the number of clients"):
        secagg.secagg_settings({"secagg-num-shares": 5}, num_clients=4)
    with pytest.raises(ValueError, match="wait forever"):
        secagg.secagg_settings({"secagg-timeout": 0}, num_clients=4)
    assert secagg.secagg_settings({}, num_clients=3)["reconstruction_threshold"] == 2


def test_kidneyscan_secagg_client_trains_its_partition(phantom_dir, tmp_path, monkeypatch) -> None:
    # Prepare: 3 hospitals over the tiny phantom; this client is partition 1.
    from types import SimpleNamespace

    from kidneyscan.data.datasets import scan_dataset
    from kidneyscan.federated import task
    from kidneyscan.federated.simulation import prepare_run

    prepared = prepare_run(
        scan_dataset(phantom_dir), tmp_path, num_clients=3, partitioning="iid", seed=0
    )
    run_config = {
        "partition-file": prepared["partition-file"],
        "image-size": 32,
        "batch-size": 8,
        "local-val-fraction": 0.0,
        "secagg-timeout": 30.0,  # a SecAgg+ key: must be ignored by the KidneyScan config
    }
    monkeypatch.delenv(task.CONFIG_ENV, raising=False)
    context = SimpleNamespace(run_config=run_config, node_config={"partition-id": 1})
    client = secagg_app.KidneyScanNumPyClient(context)
    initial = client.get_parameters({})

    # Execute
    new, num_examples, metrics = client.fit(initial, {"server-round": 1})

    # Assert: same tensors (trainable only), this partition's size, weights moved, finite loss.
    n_partition = prepared["summary"][1]["n"]
    assert [a.shape for a in new] == [a.shape for a in initial]
    assert num_examples == n_partition
    assert max(float(np.abs(a - b).max()) for a, b in zip(new, initial, strict=True)) > 0
    assert np.isfinite(metrics["train-loss"])


def test_kidneyscan_secagg_client_keeps_its_optimizer_state(phantom_dir, tmp_path, monkeypatch):
    """Breaks if the SecAgg+ client drops optimizer-state=keep: its node Context must hold the
    AdamW state after round 1 and round 2 must continue the step count."""
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from kidneyscan.data.datasets import scan_dataset
    from kidneyscan.federated import client_app, task
    from kidneyscan.federated.simulation import prepare_run

    prepared = prepare_run(
        scan_dataset(phantom_dir), tmp_path, num_clients=3, partitioning="iid", seed=0
    )
    run_config = {"partition-file": prepared["partition-file"], "image-size": 32, "batch-size": 8,
                  "local-val-fraction": 0.0, "optimizer-state": "keep"}  # fmt: skip
    monkeypatch.delenv(task.CONFIG_ENV, raising=False)
    context = SimpleNamespace(
        run_config=run_config, node_config={"partition-id": 1}, state=RecordDict()
    )
    weights = secagg_app.KidneyScanNumPyClient(context).get_parameters({})
    steps = []
    for server_round in (1, 2):  # a new client object each round, as Flower builds them
        weights, _, _ = secagg_app.KidneyScanNumPyClient(context).fit(
            weights, {"server-round": server_round}
        )
        kept = client_app.kept_optimizer_state(task.run_config(run_config), context)
        assert kept is not None
        steps.append(max(int(s["step"]) for s in kept["state"].values()))
    assert steps[1] == 2 * steps[0] > 0
