"""Hospital partitions: sizes, disjointness, skew, determinism, CSV round-trip, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kidneyscan.data.datasets import CLASSES, Sample
from kidneyscan.data.partition import (
    PartitionError,
    label_skew,
    load_partition,
    partition_samples,
    save_partitions,
)


def _samples(n: int = 240, sites: int = 3) -> list[Sample]:
    return [
        Sample(Path(f"/data/{i}.png"), i % 4, CLASSES[i % 4], f"img{i}", i, f"site{i % sites}")
        for i in range(n)
    ]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "site", "bands"])
def test_partitions_are_disjoint_and_cover_everything(scheme: str) -> None:
    samples = _samples()

    parts = partition_samples(samples, 3, scheme=scheme, alpha=0.5, min_samples=5, seed=0)

    assert len(parts) == 3
    ids = [s.image_id for part in parts for s in part]
    assert len(ids) == len(set(ids)) == len(samples)
    assert all(len(p) >= 5 for p in parts)


def test_iid_sizes_are_balanced() -> None:
    parts = partition_samples(_samples(240), 4, scheme="iid", seed=0)

    assert sorted(len(p) for p in parts) == [60, 60, 60, 60]


def test_dirichlet_is_skewed_and_iid_is_not() -> None:
    samples = _samples(400)

    iid = partition_samples(samples, 3, scheme="iid", seed=0)
    skewed = partition_samples(samples, 3, scheme="dirichlet", alpha=0.1, min_samples=5, seed=0)
    mild = partition_samples(samples, 3, scheme="dirichlet", alpha=100.0, min_samples=5, seed=0)

    assert label_skew(iid) < 0.1
    assert label_skew(skewed) > 0.3
    assert label_skew(mild) < label_skew(skewed)


def test_same_seed_same_partitions_other_seed_differs() -> None:
    samples = _samples()

    a = partition_samples(samples, 3, scheme="dirichlet", alpha=0.5, seed=7)
    b = partition_samples(samples, 3, scheme="dirichlet", alpha=0.5, seed=7)
    c = partition_samples(samples, 3, scheme="dirichlet", alpha=0.5, seed=8)

    assert a == b
    assert a != c


def test_band_partition_gives_each_client_contiguous_indices_of_every_class() -> None:
    """Breaks if a client's images interleave with another's (a patient's neighbouring slices
    would then sit in two hospitals) or a class is missing from a client."""
    samples = _samples(240)

    parts = partition_samples(samples, 3, scheme="bands")

    for c in range(4):
        ranges = [sorted(s.index for s in part if s.label == c) for part in parts]
        assert all(len(r) == 20 for r in ranges)
        assert ranges[0][-1] < ranges[1][0] and ranges[1][-1] < ranges[2][0]
    with pytest.raises(PartitionError, match="bands"):
        partition_samples(samples[:8], 3, scheme="bands")


def test_site_partition_groups_by_site() -> None:
    parts = partition_samples(_samples(), 3, scheme="site")

    assert [{s.site for s in p} for p in parts] == [{"site0"}, {"site1"}, {"site2"}]


def test_site_partition_needs_matching_site_count() -> None:
    with pytest.raises(PartitionError, match="3 sites .* 2 clients"):
        partition_samples(_samples(), 2, scheme="site")


def test_site_partition_needs_sites() -> None:
    samples = [Sample(Path("/a.png"), 0, "Cyst", "a"), Sample(Path("/b.png"), 1, "Normal", "b")]

    with pytest.raises(PartitionError, match="site for every image"):
        partition_samples(samples, 1, scheme="site")


def test_min_samples_is_enforced_with_a_clear_error() -> None:
    with pytest.raises(PartitionError, match="at least 50 samples"):
        partition_samples(_samples(60), 3, scheme="iid", min_samples=50)
    # Dirichlet with extreme skew cannot give every client 30 of 120 samples.
    with pytest.raises(PartitionError, match="dirichlet"):
        partition_samples(_samples(120), 4, scheme="dirichlet", alpha=0.01, min_samples=30)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "random"}, "unknown partitioning"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        partition_samples(_samples(), 3, **kwargs)


def test_csv_round_trip_and_client_only_loads_its_rows(tmp_path: Path) -> None:
    parts = partition_samples(_samples(), 3, scheme="dirichlet", alpha=0.5, seed=0)
    csv_path = save_partitions(parts, tmp_path / "partitions.csv")

    everything = load_partition(csv_path)
    only_one = load_partition(csv_path, partition_id=1)

    assert everything == parts
    assert only_one[1] == parts[1]
    assert only_one[0] == [] and only_one[2] == []
    with pytest.raises(PartitionError, match="no rows for partition 5"):
        load_partition(csv_path, partition_id=5)


def test_malformed_csv_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("partition,path\n0,/x.png\n")

    with pytest.raises(PartitionError, match="lacks columns"):
        load_partition(bad)
