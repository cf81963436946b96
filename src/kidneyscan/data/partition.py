"""Split a training set into simulated hospitals (federated clients).

Three schemes:

``iid``
    Uniform random split (flwr-datasets ``IidPartitioner``).
``dirichlet``
    Label skew: per class, the share of each client is drawn from Dirichlet(alpha); small
    ``alpha`` means each hospital sees mostly a few classes (flwr-datasets
    ``DirichletPartitioner``, which retries until every client has ``min_samples``).
``site``
    Natural partition by acquisition site (``Sample.site``: the phantom's hospitals, or a site
    column of a CSV for real data), i.e. scanner shift rather than label skew.

flwr-datasets partitioners expect a Hugging Face ``datasets.Dataset``; we hand them a two-column
table (``label``, ``idx``) and map the returned indices back to :class:`Sample` objects, so the
images themselves never pass through ``datasets``.

Partitions are deterministic for a seed and can be saved as CSV (one row per image with its
``partition`` number) for audit; clients then load only their own rows.
"""

from __future__ import annotations

import csv
import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kidneyscan.data.datasets import CLASSES, DataError, Sample
from kidneyscan.data.grouping import index_bands

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "site", "bands")
CSV_FIELDS = ("partition", "path", "label", "class_name", "image_id", "index", "site")


class PartitionError(DataError):
    """A partition request cannot be satisfied (too few samples, unknown scheme, ...)."""


def partition_samples(
    samples: Sequence[Sample],
    num_partitions: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    min_samples: int = 1,
    seed: int = 0,
) -> list[list[Sample]]:
    """Split ``samples`` into ``num_partitions`` disjoint client datasets.

    Parameters
    ----------
    samples
        The training samples (never the test set).
    num_partitions
        Number of clients (hospitals), >= 1.
    scheme
        ``"iid"``, ``"dirichlet"`` (label skew), ``"site"`` (by ``Sample.site``) or ``"bands"``
        (by patient where IDs are unknown: client ``i`` gets contiguous index band ``i`` of
        every class, :func:`kidneyscan.data.grouping.index_bands`; no patient is shared).
    alpha
        Dirichlet concentration (``dirichlet`` only); must be > 0. Smaller = more skew.
    min_samples
        Every client must receive at least this many samples, else :class:`PartitionError`.
    seed
        Seed of the random split; the same seed gives the same partitions.

    Returns
    -------
    list of list of Sample
        ``num_partitions`` lists, disjoint, together holding every input sample, each in the
        input order.

    Raises
    ------
    PartitionError
        Unknown scheme, ``num_partitions`` < 1, bad ``alpha``, samples without a site for
        ``site``, a site count different from ``num_partitions``, or a client below
        ``min_samples``.
    """
    samples = list(samples)
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partitioning {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if num_partitions < 1:
        raise PartitionError(f"num_partitions must be >= 1, got {num_partitions}")
    if min_samples < 0:
        raise PartitionError(f"min_samples must be >= 0, got {min_samples}")
    needed = num_partitions * max(min_samples, 1)
    if scheme != "site" and len(samples) < needed:
        raise PartitionError(
            f"{len(samples)} samples cannot give {num_partitions} clients "
            f"at least {max(min_samples, 1)} samples each"
        )

    if scheme == "site":
        parts = _by_site(samples, num_partitions)
    elif scheme == "bands":
        parts = _by_band(samples, num_partitions)
    elif scheme == "iid":
        parts = _with_flwr_datasets(samples, num_partitions, scheme, alpha, min_samples, seed)
    else:
        if not alpha > 0:
            raise PartitionError(f"dirichlet alpha must be > 0, got {alpha}")
        parts = _with_flwr_datasets(samples, num_partitions, scheme, alpha, min_samples, seed)

    for i, part in enumerate(parts):
        if len(part) < min_samples:
            raise PartitionError(
                f"client {i} ({scheme} partitioning) has {len(part)} samples, fewer than the "
                f"minimum of {min_samples}; use fewer clients, a larger alpha or more data"
            )
    return parts


def _by_site(samples: list[Sample], num_partitions: int) -> list[list[Sample]]:
    missing = [s for s in samples if not s.site]
    if missing:
        raise PartitionError(
            f"'site' partitioning needs a site for every image; {len(missing)} have none "
            f"(first: {missing[0].path}). Use the phantom's sites or a CSV with a site column."
        )
    sites = sorted({str(s.site) for s in samples})
    if len(sites) != num_partitions:
        raise PartitionError(
            f"'site' partitioning: the data has {len(sites)} sites ({', '.join(sites)}) "
            f"but {num_partitions} clients were requested; they must be equal"
        )
    return [[s for s in samples if str(s.site) == site] for site in sites]


def _by_band(samples: list[Sample], num_partitions: int) -> list[list[Sample]]:
    if num_partitions == 1:
        return [samples]
    try:
        bands = index_bands(samples, num_partitions)
    except DataError as exc:
        raise PartitionError(f"'bands' partitioning: {exc}") from exc
    return [
        [s for s, b in zip(samples, bands, strict=True) if b == i] for i in range(num_partitions)
    ]


def _with_flwr_datasets(
    samples: list[Sample],
    num_partitions: int,
    scheme: str,
    alpha: float,
    min_samples: int,
    seed: int,
) -> list[list[Sample]]:
    # Imported here: `datasets` is slow to import and only the partitioning needs it.
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    table = Dataset.from_dict(
        {"label": [int(s.label) for s in samples], "idx": list(range(len(samples)))}
    )
    partitioner: Any
    if scheme == "iid":
        # IidPartitioner splits in order: shuffle first so the split is random but seeded.
        order = np.random.default_rng(seed).permutation(len(samples))
        table = table.select(order.tolist())
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=max(min_samples, 0),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = table
    parts: list[list[Sample]] = []
    try:
        with warnings.catch_warnings():
            # Its per-retry warnings are noise: failure after the retries raises below.
            warnings.simplefilter("ignore", UserWarning)
            for pid in range(num_partitions):
                idx = sorted(int(i) for i in partitioner.load_partition(pid)["idx"])
                parts.append([samples[i] for i in idx])
    except ValueError as exc:  # DirichletPartitioner gives up after 10 draws below the minimum
        raise PartitionError(
            f"{scheme} partitioning of {len(samples)} samples into {num_partitions} clients "
            f"failed: {exc}"
        ) from exc
    return parts


def partition_summary(
    parts: Sequence[Sequence[Sample]], classes: Sequence[str] = CLASSES
) -> list[dict[str, Any]]:
    """Per-client counts (total, per class, per site) for logs, reports and the CLI."""
    rows = []
    for i, part in enumerate(parts):
        per_class = Counter(s.class_name for s in part)
        rows.append(
            {
                "partition": i,
                "n": len(part),
                "per_class": {c: per_class.get(c, 0) for c in classes},
                "sites": dict(Counter(str(s.site) for s in part if s.site)),
            }
        )
    return rows


def label_skew(parts: Sequence[Sequence[Sample]], num_classes: int = len(CLASSES)) -> float:
    """Mean total-variation distance between each client's label mix and the pooled mix.

    0 for identical label distributions, up to 1 for disjoint ones; used to check that
    Dirichlet partitions are skewed and IID ones are not.
    """
    pooled = np.zeros(num_classes)
    dists = []
    for part in parts:
        counts = np.bincount([s.label for s in part], minlength=num_classes).astype(float)
        pooled += counts
        dists.append(counts / max(counts.sum(), 1.0))
    pooled /= max(pooled.sum(), 1.0)
    return float(np.mean([0.5 * np.abs(d - pooled).sum() for d in dists]))


def save_partitions(parts: Sequence[Sequence[Sample]], path: str | Path) -> Path:
    """Write partitions as CSV (one row per image, column ``partition``) for audit and loading."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for pid, part in enumerate(parts):
            for s in part:
                writer.writerow(
                    {
                        "partition": pid,
                        "path": str(s.path),
                        "label": s.label,
                        "class_name": s.class_name,
                        "image_id": s.image_id,
                        "index": "" if s.index is None else s.index,
                        "site": s.site or "",
                    }
                )
    return out


def load_partition(path: str | Path, partition_id: int | None = None) -> list[list[Sample]]:
    """Read a CSV written by :func:`save_partitions`.

    Parameters
    ----------
    path
        The partition CSV.
    partition_id
        If given, only that client's rows are materialised (the returned list still has one
        entry per partition; the others are empty), so a client never holds other sites' paths
        as Sample objects.

    Raises
    ------
    PartitionError
        Missing file, missing columns, a malformed row, or a ``partition_id`` absent from the file.
    """
    p = Path(path)
    if not p.is_file():
        raise PartitionError(f"{p}: partition file not found")
    parts: dict[int, list[Sample]] = {}
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        lacking = set(CSV_FIELDS) - set(reader.fieldnames or [])
        if lacking:
            raise PartitionError(f"{p}: partition CSV lacks columns {sorted(lacking)}")
        for lineno, row in enumerate(reader, start=2):
            try:
                pid = int(row["partition"])
                parts.setdefault(pid, [])
                if partition_id is not None and pid != partition_id:
                    continue
                parts[pid].append(
                    Sample(
                        path=Path(row["path"]),
                        label=int(row["label"]),
                        class_name=row["class_name"],
                        image_id=row["image_id"],
                        index=int(row["index"]) if row["index"] else None,
                        site=row["site"] or None,
                    )
                )
            except (TypeError, ValueError) as exc:
                raise PartitionError(f"{p}: line {lineno} is malformed ({exc})") from exc
    if not parts:
        raise PartitionError(f"{p}: partition CSV has no rows")
    n = max(parts) + 1
    if partition_id is not None and partition_id not in parts:
        raise PartitionError(f"{p}: no rows for partition {partition_id} (file has 0..{n - 1})")
    return [parts.get(i, []) for i in range(n)]
