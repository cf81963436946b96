"""Leakage groups for CT slices without patient IDs: index blocks, bands, pHash clusters.

Which images must stay on one side of a split; the groupings are described in
:mod:`kidneyscan.data.splits`, which assigns whole groups to splits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np
from rich.progress import track
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kidneyscan.data.datasets import DataError, Sample, load_image

GROUPINGS: tuple[str, ...] = (
    "auto",
    "none",
    "patient",
    "bands",
    "blocks",
    "phash",
    "blocks+phash",
)


#: Largest index gap inside one block. The shared 1,000-image sample keeps every 1st-5th slice
#: of contiguous runs, so neighbours of one run are 1-5 apart; runs are separated by 13 or more.
DEFAULT_MAX_GAP = 10


#: Largest pHash Hamming distance (of 64 bits) for near-duplicates. On the real sample,
#: neighbouring slices of a run have a median distance of 2, images of different classes
#: 16 (0.1st percentile 8); see docs/data.md.
DEFAULT_MAX_DISTANCE = 4


#: Largest pHash distance between index neighbours still linked in ``blocks+phash``. On the
#: real sample 99 % of consecutive in-block pairs are within 12 bits (median 2) and unrelated
#: images of one class are 10-14 bits apart at their 1st-5th percentile; on the phantom this
#: cuts 82 % of patient boundaries and 0.4 % of same-patient neighbours (docs/data.md).
DEFAULT_MAX_JUMP: int | None = 12


def phash(image: np.ndarray, *, hash_size: int = 8, highfreq_factor: int = 4) -> np.ndarray:
    """DCT perceptual hash of a grayscale image (the classic pHash, as in ``imagehash.phash``).

    The image is shrunk to ``hash_size * highfreq_factor`` pixels square, transformed with a
    2-D DCT, and each of the ``hash_size**2`` lowest-frequency coefficients is compared with
    their median.

    Parameters
    ----------
    image
        float32 ``(H, W)`` image in [0, 1].

    Returns
    -------
    np.ndarray
        bool array of ``hash_size**2`` bits.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise DataError(f"phash: expected a 2-D image, got shape {img.shape}")
    side = hash_size * highfreq_factor
    small = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:hash_size, :hash_size]
    return (low > np.median(low)).ravel()


def compute_phashes(samples: Sequence[Sample], *, progress: bool = False) -> np.ndarray:
    """pHash of every sample's image: bool array ``(N, 64)``; unreadable files raise DataError."""
    out = np.zeros((len(samples), 64), dtype=bool)
    for i, s in enumerate(_progress(samples, progress, "pHash")):
        out[i] = phash(load_image(s.path))
    return out


def _progress(items: Sequence[Any], enabled: bool, label: str) -> Iterable[Any]:
    if not enabled:
        return items
    return track(items, description=label, total=len(items), transient=True)


def hamming_pairs(hashes: np.ndarray, max_distance: int, *, chunk: int = 256) -> np.ndarray:
    """All pairs ``i < j`` whose hashes differ in at most ``max_distance`` bits.

    Returns
    -------
    np.ndarray
        int64 ``(M, 3)``: columns ``i``, ``j``, distance.
    """
    bits = np.asarray(hashes, dtype=bool)
    n = len(bits)
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    packed = np.packbits(bits, axis=1)
    pad = (-packed.shape[1]) % 8
    # As 64-bit words, XOR + popcount counts differing bits with few operations per pair.
    words = np.ascontiguousarray(np.pad(packed, ((0, 0), (0, pad)))).view(np.uint64)
    found = []
    for start in range(0, n, chunk):
        block = words[start : start + chunk]
        dist = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(-1, dtype=np.int64)
        ii, jj = np.nonzero(dist <= max_distance)
        keep = ii + start < jj
        ii, jj = ii[keep], jj[keep]
        found.append(np.stack([ii + start, jj, dist[ii, jj]], axis=1))
    return np.concatenate(found).astype(np.int64)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes linked by ``pairs[:, :2]``, numbered by first node."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rows = pairs[:, 0] if len(pairs) else np.zeros(0, dtype=np.int64)
    cols = pairs[:, 1] if len(pairs) else np.zeros(0, dtype=np.int64)
    adj = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(adj, directed=False)
    return renumber(labels)


def renumber(labels: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Group ids 0..G-1 in order of first appearance (stable across runs)."""
    seen: dict[Any, int] = {}
    return np.array([seen.setdefault(v, len(seen)) for v in labels], dtype=np.int64)


def _block_pairs(
    samples: Sequence[Sample],
    max_gap: int,
    hashes: np.ndarray | None = None,
    max_jump: int | None = None,
) -> np.ndarray:
    """Links between index-neighbours (gap <= ``max_gap``) of the same class.

    With ``hashes`` and ``max_jump``, neighbours whose hashes differ by more bits are not linked.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.index is not None:
            by_class[s.label].append(i)
    pairs = []
    for members in by_class.values():
        members.sort(key=lambda i: (samples[i].index, str(samples[i].path)))
        for a, b in zip(members, members[1:], strict=False):
            if samples[b].index - samples[a].index > max_gap:  # type: ignore[operator]
                continue
            if _jumps(hashes, a, b, max_jump):
                continue  # a jump in content: a new patient inside the run
            pairs.append((a, b))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def _jumps(hashes: np.ndarray | None, a: int, b: int, max_jump: int | None) -> bool:
    """True when images ``a`` and ``b`` differ by more than ``max_jump`` pHash bits."""
    if hashes is None or max_jump is None:
        return False
    return int(np.count_nonzero(hashes[a] != hashes[b])) > max_jump


def index_blocks(samples: Sequence[Sample], *, max_gap: int = DEFAULT_MAX_GAP) -> np.ndarray:
    """Group ids of contiguous index blocks within each class.

    Samples without an index in their file name are groups of their own.
    """
    if max_gap < 0:
        raise DataError(f"max_gap must be >= 0, got {max_gap}")
    return _components(len(samples), _block_pairs(samples, max_gap))


def index_bands(
    samples: Sequence[Sample], n_bands: int, *, max_gap: int = DEFAULT_MAX_GAP
) -> np.ndarray:
    """Band ``0..n_bands-1`` of every sample: its class's images in file-number order, cut into
    ``n_bands`` contiguous runs of about equal size (images without a number follow, by path).

    A cut never falls inside an index block (numbers at most ``max_gap`` apart, see
    :func:`index_blocks`): a block, most often one patient's neighbouring slices, goes whole to
    the band that holds most of it, so a patient at a band's edge is not shared with the next
    band. Blocks longer than a band (contiguously numbered data) are cut by rank as they are.

    Raises
    ------
    DataError
        ``n_bands < 2`` or a class with fewer images than bands.
    """
    if n_bands < 2:
        raise DataError(f"bands need n_bands >= 2, got {n_bands}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_class[s.label].append(i)
    blocks = index_blocks(samples, max_gap=max_gap)
    bands = np.zeros(len(samples), dtype=np.int64)
    for members in by_class.values():
        if len(members) < n_bands:
            raise DataError(
                f"class {samples[members[0]].class_name!r} has {len(members)} image(s), fewer "
                f"than the {n_bands} bands"
            )
        members.sort(
            key=lambda i: (samples[i].index is None, samples[i].index or 0, str(samples[i].path))
        )
        for rank, i in enumerate(members):
            bands[i] = rank * n_bands // len(members)
        per_band = len(members) / n_bands
        block_members: dict[int, list[int]] = defaultdict(list)
        for i in members:
            block_members[int(blocks[i])].append(i)
        for idx in block_members.values():
            if 1 < len(idx) <= per_band:
                bands[idx] = np.bincount(bands[idx]).argmax()
    return bands


def phash_clusters(hashes: np.ndarray, *, max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Group ids of near-duplicate clusters (single linkage at ``max_distance`` bits)."""
    if max_distance < 0:
        raise DataError(f"max_distance must be >= 0, got {max_distance}")
    return _components(len(hashes), hamming_pairs(hashes, max_distance)[:, :2])


def resolve_grouping(samples: Sequence[Sample], grouping: str) -> str:
    """Name of the grouping ``auto`` stands for; checks the name."""
    if grouping not in GROUPINGS:
        raise DataError(f"unknown grouping {grouping!r}; expected one of {', '.join(GROUPINGS)}")
    if grouping == "auto":
        has_patients = bool(samples) and all(s.patient_id for s in samples)
        return "patient" if has_patients else "bands"
    return grouping


def groups_for(
    samples: Sequence[Sample],
    *,
    grouping: str = "auto",
    max_gap: int = DEFAULT_MAX_GAP,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    max_jump: int | None = DEFAULT_MAX_JUMP,
    hashes: np.ndarray | None = None,
    progress: bool = False,
    n_bands: int = 5,
) -> np.ndarray:
    """Group id of every sample (images of one group must stay in one split).

    Parameters
    ----------
    samples
        The dataset.
    grouping
        One of :data:`GROUPINGS` (see the module docstring).
    max_gap
        Largest index gap inside a block (``blocks``).
    max_distance
        Largest pHash Hamming distance for near-duplicates (``phash``).
    max_jump
        In ``blocks+phash``, largest pHash distance between linked index neighbours
        (``None``: no content check, the plain union).
    hashes
        Precomputed :func:`compute_phashes` output (saves reading every image again).
    progress
        Show a progress bar while hashing.
    n_bands
        Bands per class (``bands``).

    Returns
    -------
    np.ndarray
        int64 group ids ``0..G-1``, numbered in order of first appearance.
    """
    kind = resolve_grouping(samples, grouping)
    n = len(samples)
    if kind == "none":
        return np.arange(n, dtype=np.int64)
    if kind == "bands":
        bands = index_bands(samples, n_bands)
        return renumber([(s.label, int(b)) for s, b in zip(samples, bands, strict=True)])
    if kind == "patient":
        missing = [s.path for s in samples if not s.patient_id]
        if missing:
            raise DataError(
                f"grouping 'patient' needs patient ids; {len(missing)} sample(s) have none,"
                f" e.g. {missing[0]}"
            )
        # Patient ids are per class folder in the phantom, so key on (class, patient).
        return renumber([(s.label, s.patient_id) for s in samples])
    for name, value in (("max_gap", max_gap), ("max_distance", max_distance)):
        if value < 0:
            raise DataError(f"{name} must be >= 0, got {value}")
    if max_jump is not None and max_jump < 0:
        raise DataError(f"max_jump must be >= 0 or None, got {max_jump}")
    if "phash" in kind:
        if hashes is None:
            hashes = compute_phashes(samples, progress=progress)
        elif len(hashes) != n:
            raise DataError(f"hashes has {len(hashes)} rows for {n} samples")
    links = []
    if kind == "blocks":
        links.append(_block_pairs(samples, max_gap))
    if kind == "blocks+phash":
        links.append(_block_pairs(samples, max_gap, hashes, max_jump))
    if "phash" in kind and hashes is not None:
        links.append(hamming_pairs(hashes, max_distance)[:, :2])
    return _components(n, np.concatenate(links))
