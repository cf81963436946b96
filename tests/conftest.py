"""Shared fixtures: tiny phantom datasets (64 px) and the optional real CT-KIDNEY sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny test models gain nothing from intra-op threads, and on a 2-core machine extra threads
# (also in the Flower and server subprocesses, which inherit the environment) only spin.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def _find_real_data() -> Path:
    """``../shared/data/ct-kidney`` beside the checkout (or beside a parent, for worktrees)."""
    if "KIDNEYSCAN_REAL_DATA" in os.environ:
        return Path(os.environ["KIDNEYSCAN_REAL_DATA"])
    for parent in REPO.parents:
        candidate = parent / "shared/data/ct-kidney"
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared/data/ct-kidney"


REAL_DATA = _find_real_data()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Pin torch to one intra-op thread for the whole suite (see OMP_NUM_THREADS above)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny phantom dataset in the CT-KIDNEY layout: 48 images of 64 px from 3 sites."""
    from kidneyscan.data.phantom import generate_dataset

    out = tmp_path_factory.mktemp("phantom")
    generate_dataset(out, n=48, seed=0, sites=3, image_size=64)
    return out


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real CT-KIDNEY sample in ../shared; tests using it skip when it is absent."""
    if not (REAL_DATA / "kidneyData.csv").is_file():
        pytest.skip(f"real CT-KIDNEY sample not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the running task's ids; outside a Flower process set them."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
