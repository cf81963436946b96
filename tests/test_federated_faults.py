"""Faults on a real loopback federation: too few nodes -> clear non-zero exit; a node dies."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import kidneyscan
from kidneyscan.federated import deploy
from kidneyscan.federated.grid import NodeDeadlineGrid, NodesUnavailableError

pytestmark = pytest.mark.slow

SRC = str(Path(kidneyscan.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[deploy.LocalFederation]:
    """One insecure SuperLink + 3 SuperNodes shared by the fault drills (start-up is costly)."""
    workdir = tmp_path_factory.mktemp("faults")
    fed = deploy.LocalFederation(workdir, num_nodes=3, tls=False, env={"PYTHONPATH": SRC})
    fed.start()
    yield fed
    assert fed.stop() == []


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deploy.write_smoke_app(tmp_path_factory.mktemp("app"))


def test_too_few_nodes_fails_with_clear_message(
    federation: deploy.LocalFederation, app_dir: Path, tmp_path: Path
) -> None:
    # Execute: ask for 4 hospitals while 3 are up, with a 5 s node deadline.
    t0 = time.monotonic()
    outcome = federation.run(
        app_dir, {"min-clients": 4, "node-timeout": 5.0, "out-dir": str(tmp_path)}
    )

    # Assert: the run failed (the ServerApp exited non-zero), soon, and says why.
    assert outcome.status == "finished:failed"
    assert "only 3 of the minimum 4 SuperNodes" in outcome.details
    assert time.monotonic() - t0 < 120
    result = json.loads((tmp_path / "smoke_result.json").read_text())
    assert "node-timeout" in result["error"] and result["rounds"] == []


def test_supernode_killed_mid_round_others_finish(
    federation: deploy.LocalFederation, app_dir: Path, tmp_path: Path
) -> None:
    # Prepare: partition 2 sleeps 30 s in round 1; kill its SuperNode once it is training.
    victim = federation.nodes[2]
    marker = tmp_path / "partition-2.training"
    killed_at: list[float] = []

    def kill_when_training() -> None:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        killed_at.append(time.monotonic())
        victim.signal(signal.SIGTERM)

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()

    # Execute
    outcome = federation.run(
        app_dir,
        {
            "num-server-rounds": 2,
            "min-clients": 2,
            "slow-partition": 2,
            "slow-seconds": 30.0,
            "round-timeout": 90.0,
            "out-dir": str(tmp_path),
        },
    )
    killer.join(timeout=5)

    # Assert: round 1 aggregated the 2 survivors, the loss was logged, round 2 ran with 2.
    assert outcome.ok, outcome.details + outcome.output[-3000:]
    assert killed_at, "the slow partition never started training"
    result = json.loads((tmp_path / "smoke_result.json").read_text())
    first, second = result["rounds"]
    assert first["replies"] == 2 and len(first["failed"]) == 1
    assert second["replies"] == 2 and not second["failed"] and not second["no_reply"]
    assert "dropped out" in outcome.output
    assert result["accuracy"]["2"] > result["accuracy"]["0"]
    assert not victim.alive()


class _FakeGrid:
    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def get_node_ids(self) -> list[int]:
        n = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        return list(range(n))


def test_node_deadline_grid_resets_and_raises() -> None:
    # Enough nodes, then a short dip (recovers), then too few for longer than the deadline.
    grid = NodeDeadlineGrid(_FakeGrid([3, 1, 3, 1]), min_nodes=2, timeout_s=0.3)
    assert len(list(grid.get_node_ids())) == 3
    assert len(list(grid.get_node_ids())) == 1  # starts the clock
    assert len(list(grid.get_node_ids())) == 3  # recovered: clock reset
    assert len(list(grid.get_node_ids())) == 1
    time.sleep(0.4)
    with pytest.raises(NodesUnavailableError, match="only 1 of the minimum 2"):
        grid.get_node_ids()
    with pytest.raises(ValueError, match="min_nodes"):
        NodeDeadlineGrid(_FakeGrid([1]), min_nodes=0, timeout_s=1)
