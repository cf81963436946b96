"""Leakage-aware train/val/test and k-fold splits for CT slices without patient IDs.

The public CT-KIDNEY data has no patient IDs, and a random image-level split puts neighbouring
slices of one patient on both sides (one reason published accuracies sit at 99-100 %). Images
are therefore grouped, and whole groups are assigned to splits:

* ``blocks``: contiguous index blocks within a class. File numbers (``Cyst- (1219)``) follow
  the order slices were exported, so numbers at most ``max_gap`` apart are taken as one patient.
* ``phash``: near-duplicate clusters. Images whose 64-bit DCT perceptual hashes differ in at most
  ``max_distance`` bits are linked, and linked images (single linkage) form one cluster.
* ``blocks+phash``: the union (connected components of both link kinds), where index
  neighbours whose hashes differ by more than ``max_jump`` bits (as much as unrelated images
  do) are not linked: a jump in content marks a new patient inside a run of contiguous
  numbers (the full public dataset is numbered contiguously, so pure index blocks would merge
  each class into one group). ``max_jump=None`` gives the plain union. Near duplicates never
  cross splits either way.
* ``bands``: the strictest grouping without patient IDs. Each class's images, in file-number
  order, are cut into K contiguous bands of equal size, and fold k is band k of every class.
  Blocks and near-duplicate clusters still leak on the real sample (unseen patients scored
  0.15-0.40 below such cross-validation); a band holds several whole patients, so only the
  patients at a band's two ends can be shared with the neighbouring band.
* ``patient``: the true patient IDs, known for synthetic data (the phantom).
* ``auto``: ``patient`` when every sample has a patient ID, else ``bands``.
* ``none``: every image its own group (the leaky image-level split, for comparison only).

Splits use scikit-learn's :class:`~sklearn.model_selection.StratifiedGroupKFold`, and are saved
as CSV (``path,image_id,Class,label,group,split``) so that a run can be repeated exactly.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kidneyscan.data.datasets import CLASSES, DataError, Sample, class_index, load_image

log = logging.getLogger(__name__)

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
#: Above this many (test, val) fold combinations, folds are picked greedily.
MAX_FOLD_CHOICES = 5000
#: Largest pHash distance between index neighbours still linked in ``blocks+phash``. On the
#: real sample 99 % of consecutive in-block pairs are within 12 bits (median 2) and unrelated
#: images of one class are 10-14 bits apart at their 1st-5th percentile; on the phantom this
#: cuts 82 % of patient boundaries and 0.4 % of same-patient neighbours (docs/data.md).
DEFAULT_MAX_JUMP: int | None = 12
SPLIT_COLUMNS: tuple[str, ...] = ("path", "image_id", "Class", "label", "group", "split")
_SPLIT_NAME = re.compile(r"^(train|val|test|fold\d+)$")


class Split(dict[str, list[Sample]]):
    """A mapping from split name to samples, plus each sample's group and how it was made.

    Attributes
    ----------
    groups : dict
        Sample path -> group id.
    info : dict
        Parameters and counts (grouping, seed, fractions, per-split class counts).
    """

    def __init__(
        self,
        parts: dict[str, list[Sample]] | None = None,
        groups: dict[Path, int] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(parts or {})
        self.groups: dict[Path, int] = dict(groups or {})
        self.info: dict[str, Any] = dict(info or {})


# --------------------------------------------------------------------------- perceptual hash


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
    import cv2

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
    from rich.progress import track

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


# --------------------------------------------------------------------------- groupings


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes linked by ``pairs[:, :2]``, numbered by first node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rows = pairs[:, 0] if len(pairs) else np.zeros(0, dtype=np.int64)
    cols = pairs[:, 1] if len(pairs) else np.zeros(0, dtype=np.int64)
    adj = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(adj, directed=False)
    return _renumber(labels)


def _renumber(labels: Sequence[Any] | np.ndarray) -> np.ndarray:
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
        return _renumber([(s.label, int(b)) for s, b in zip(samples, bands, strict=True)])
    if kind == "patient":
        missing = [s.path for s in samples if not s.patient_id]
        if missing:
            raise DataError(
                f"grouping 'patient' needs patient ids; {len(missing)} sample(s) have none,"
                f" e.g. {missing[0]}"
            )
        # Patient ids are per class folder in the phantom, so key on (class, patient).
        return _renumber([(s.label, s.patient_id) for s in samples])
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


# --------------------------------------------------------------------------- splitting


def _assign_folds(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Fold id per sample from StratifiedGroupKFold (whole groups, class mix balanced)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise DataError(
            f"only {n_groups} group(s) for {n_splits} folds; use more data, a finer grouping"
            " (e.g. a smaller max_gap, max_distance or max_jump) or fewer / larger splits"
        )
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = np.full(len(labels), -1, dtype=np.int64)
    x = np.zeros((len(labels), 1))
    for k, (_, held) in enumerate(sgkf.split(x, labels, groups)):
        folds[held] = k
    return folds


def _fold_count(val: float, test: float) -> tuple[int, int, int]:
    """Number of folds K and how many go to test and to val, approximating the fractions."""
    for name, frac in (("val", val), ("test", test)):
        if not 0.0 <= frac < 1.0:
            raise DataError(f"{name} fraction must be in [0, 1), got {frac}")
    if val + test >= 1.0:
        raise DataError(f"val + test = {val + test:g} leaves nothing to train on")
    positive = [f for f in (val, test) if f > 0]
    if not positive:
        return 1, 0, 0
    k = max(2, round(1.0 / min(positive)))
    n_test, n_val = round(test * k), round(val * k)
    if n_test + n_val >= k:
        k += 1
    return k, n_test, n_val


def _choose_folds(
    labels: np.ndarray,
    folds: np.ndarray,
    k: int,
    n_test: int,
    n_val: int,
    val: float,
    test: float,
) -> tuple[set[int], set[int]]:
    """Pick which folds become test and val.

    With few, large groups (the real sample has 5 to 15 per class) some folds lack a class
    entirely, so taking folds 0 and 1 can leave a class out of test. Every choice of folds is
    scored by how far each split's class mix and size are from the targets, with a heavy
    penalty for a class missing from a split (greedily when there are more than
    :data:`MAX_FOLD_CHOICES` choices); ties keep the lowest fold numbers, so the result is
    still determined by the seed.
    """
    from itertools import combinations
    from math import comb

    if n_test + n_val == 0:
        return set(), set()
    classes = np.unique(labels)
    # counts[f, c]: images of class c in fold f; every score below works on these sums only.
    counts = np.array([[np.sum((folds == f) & (labels == c)) for c in classes] for f in range(k)])
    overall = counts.sum(axis=0) / max(len(labels), 1)
    n = len(labels)

    def cost(members: Sequence[int], target: float) -> float:
        if not members:
            return 0.0
        per_class = counts[list(members)].sum(axis=0)
        size = int(per_class.sum())
        if size == 0:
            return 1e6
        mix = per_class / size
        missing = int((per_class == 0).sum())
        return 10.0 * missing + float(np.abs(mix - overall).sum()) + abs(size / n - target)

    if comb(k, n_test) * comb(k - n_test, n_val) > MAX_FOLD_CHOICES:
        # Too many combinations (many small folds): add the best fold one at a time instead.
        chosen: dict[str, list[int]] = {"test": [], "val": []}
        for name, count, target in (("test", n_test, test), ("val", n_val, val)):
            for _ in range(count):
                free = [f for f in range(k) if f not in chosen["test"] + chosen["val"]]
                # Score the partial set against the share it should reach at this point.
                share = target * (len(chosen[name]) + 1) / count
                best_f = min(free, key=lambda f: (cost([*chosen[name], f], share), f))
                chosen[name].append(best_f)
        return set(chosen["test"]), set(chosen["val"])
    best: tuple[float, tuple[int, ...], tuple[int, ...]] | None = None
    for tf in combinations(range(k), n_test):
        rest = [f for f in range(k) if f not in tf]
        for vf in combinations(rest, n_val):
            score = cost(tf, test) + cost(vf, val)
            if best is None or score < best[0] - 1e-12:
                best = (score, tf, vf)
    assert best is not None
    return set(best[1]), set(best[2])


def _class_counts(samples: Iterable[Sample]) -> dict[str, int]:
    counts = Counter(s.class_name for s in samples)
    return {c: counts[c] for c in sorted(counts, key=_class_order)}


def _class_order(name: str) -> int:
    """Position of ``name`` in :data:`CLASSES` (unknown names sort last)."""
    try:
        return class_index(name)
    except DataError:
        return len(CLASSES)


def _finish(
    parts: dict[str, list[Sample]],
    samples: Sequence[Sample],
    groups: np.ndarray,
    info: dict[str, Any],
) -> Split:
    n = len(samples)
    info["fractions"] = {k: round(len(v) / n, 4) if n else 0.0 for k, v in parts.items()}
    info["per_split"] = {k: _class_counts(v) for k, v in parts.items()}
    classes = {s.class_name for s in samples}
    for name, members in parts.items():
        absent = classes - {s.class_name for s in members}
        if members and absent:
            log.warning(
                "split %r has no %s images (too few groups)", name, ", ".join(sorted(absent))
            )
    return Split(parts, {s.path: int(g) for s, g in zip(samples, groups, strict=True)}, info)


def make_split(
    samples: Sequence[Sample],
    *,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    grouping: str = "auto",
    max_gap: int = DEFAULT_MAX_GAP,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    max_jump: int | None = DEFAULT_MAX_JUMP,
    groups: np.ndarray | None = None,
    hashes: np.ndarray | None = None,
    progress: bool = False,
) -> Split:
    """Stratified group train/val/test split: no group is in two splits.

    The data are cut into ``K = round(1 / min(val, test))`` stratified group folds
    (:class:`~sklearn.model_selection.StratifiedGroupKFold`); ``round(test * K)`` folds become
    ``test`` and ``round(val * K)`` folds ``val`` (15 % / 15 % -> K = 7, about 14.3 % each).
    Because whole groups move, the realised fractions are close to, not equal to, the targets;
    they are recorded in ``split.info["fractions"]``.

    Parameters
    ----------
    samples
        The dataset (e.g. from :func:`~kidneyscan.data.datasets.scan_dataset`).
    val, test
        Target fractions of the images.
    seed
        Seed of the fold shuffle: the same inputs and seed give the same split.
    grouping, max_gap, max_distance, max_jump, hashes, progress
        As for :func:`groups_for`.
    groups
        Precomputed group ids (overrides ``grouping``).

    Returns
    -------
    Split
        ``{"train": [...], "val": [...], "test": [...]}`` with ``.groups`` and ``.info``.

    Raises
    ------
    DataError
        Bad fractions, an unknown grouping, or fewer groups than folds.
    """
    samples = list(samples)
    if not samples:
        raise DataError("make_split: no samples")
    k, n_test, n_val = _fold_count(val, test)
    kind = "given" if groups is not None else resolve_grouping(samples, grouping)
    if kind == "bands":
        target = {"val": val, "test": test}
        return _band_split(samples, k, n_test, n_val, seed, {"target": target})
    if groups is None:
        groups = groups_for(
            samples,
            grouping=kind,
            max_gap=max_gap,
            max_distance=max_distance,
            max_jump=max_jump,
            hashes=hashes,
            progress=progress,
        )
    groups = np.asarray(groups)
    if len(groups) != len(samples):
        raise DataError(f"groups has {len(groups)} entries for {len(samples)} samples")
    labels = np.array([s.label for s in samples])
    if k == 1:
        folds = np.full(len(samples), k, dtype=np.int64)
    else:
        folds = _assign_folds(labels, groups, k, seed)
    test_folds, val_folds = _choose_folds(labels, folds, k, n_test, n_val, val, test)
    parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for s, f in zip(samples, folds, strict=True):
        name = "test" if f in test_folds else "val" if f in val_folds else "train"
        parts[name].append(s)
    info = {
        "grouping": kind,
        "max_gap": max_gap,
        "max_distance": max_distance,
        "max_jump": max_jump,
        "seed": seed,
        "target": {"val": val, "test": test},
        "n_folds": k,
        "n_groups": int(len(np.unique(groups))),
    }
    return _finish(parts, samples, groups, info)


def make_kfold(
    samples: Sequence[Sample],
    k: int = 5,
    *,
    test: float = 0.0,
    seed: int = 0,
    grouping: str = "auto",
    max_gap: int = DEFAULT_MAX_GAP,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    max_jump: int | None = DEFAULT_MAX_JUMP,
    groups: np.ndarray | None = None,
    hashes: np.ndarray | None = None,
    progress: bool = False,
) -> Split:
    """Stratified group k-fold: splits ``fold0`` .. ``fold{k-1}`` (and ``test`` if asked).

    With ``test > 0`` a test set is held out first (as in :func:`make_split`) and the folds are
    made from the rest. Use :func:`kfold_pairs` to get (train, val) per fold.

    Raises
    ------
    DataError
        ``k < 2``, bad ``test``, an unknown grouping, or fewer groups than folds.
    """
    samples = list(samples)
    if k < 2:
        raise DataError(f"k-fold needs k >= 2, got {k}")
    if not samples:
        raise DataError("make_kfold: no samples")
    kind = "given" if groups is not None else resolve_grouping(samples, grouping)
    if kind == "bands":
        # k folds, plus one more band per class as the test set when a test set is asked for.
        n_test = 1 if test > 0 else 0
        info = {"k": k, "target": {"test": test}}
        return _band_split(samples, k + n_test, n_test, 0, seed, info, kfold=True)
    if groups is None:
        groups = groups_for(
            samples,
            grouping=kind,
            max_gap=max_gap,
            max_distance=max_distance,
            max_jump=max_jump,
            hashes=hashes,
            progress=progress,
        )
    groups = np.asarray(groups)
    labels = np.array([s.label for s in samples])
    is_test = np.zeros(len(samples), dtype=bool)
    if test > 0:
        kt, n_test, _ = _fold_count(0.0, test)
        is_test = _assign_folds(labels, groups, kt, seed) < n_test
    rest = np.nonzero(~is_test)[0]
    folds = np.full(len(samples), -1, dtype=np.int64)
    folds[rest] = _assign_folds(labels[rest], groups[rest], k, seed)
    parts: dict[str, list[Sample]] = {f"fold{i}": [] for i in range(k)}
    if test > 0:
        parts["test"] = []
    for i, s in enumerate(samples):
        parts["test" if is_test[i] else f"fold{folds[i]}"].append(s)
    info = {
        "grouping": kind,
        "max_gap": max_gap,
        "max_distance": max_distance,
        "max_jump": max_jump,
        "seed": seed,
        "k": k,
        "target": {"test": test},
        "n_groups": int(len(np.unique(groups))),
    }
    return _finish(parts, samples, groups, info)


def _band_split(
    samples: list[Sample],
    n_bands: int,
    n_test: int,
    n_val: int,
    seed: int,
    info: dict[str, Any],
    *,
    kfold: bool = False,
) -> Split:
    """Split by contiguous index bands; which bands become test / val is drawn by ``seed``.

    The first ``n_test`` bands of a seeded permutation are ``test``, the next ``n_val`` are
    ``val``; the remaining bands are ``train`` or, with ``kfold``, ``fold0, fold1, ...`` in
    band order (so without a test set, ``fold{b}`` is band ``b`` of every class).
    """
    bands = index_bands(samples, n_bands)
    order = [int(b) for b in np.random.default_rng(seed).permutation(n_bands)]
    name_of = {b: "test" for b in order[:n_test]}
    name_of.update({b: "val" for b in order[n_test : n_test + n_val]})
    rest = [b for b in range(n_bands) if b not in name_of]
    name_of.update({b: f"fold{i}" if kfold else "train" for i, b in enumerate(rest)})
    names = (["test"] if n_test else []) + (["val"] if n_val else [])
    names += [f"fold{i}" for i in range(len(rest))] if kfold else ["train"]
    parts: dict[str, list[Sample]] = {n: [] for n in sorted(names, key=_split_order)}
    for s, band in zip(samples, bands, strict=True):
        parts[name_of[int(band)]].append(s)
    groups = _renumber([(s.label, int(b)) for s, b in zip(samples, bands, strict=True)])
    info = {
        "grouping": "bands",
        "n_bands": n_bands,
        "seed": seed,
        **info,
        "n_groups": int(len(np.unique(groups))),
        "test_bands": sorted(order[:n_test]),
        "val_bands": sorted(order[n_test : n_test + n_val]),
    }
    return _finish(parts, samples, groups, info)


def _split_order(name: str) -> tuple[int, int]:
    """train, val, test, then fold0, fold1, ... (the order splits are listed in)."""
    fixed = {"train": 0, "val": 1, "test": 2}
    return (fixed[name], 0) if name in fixed else (3, int(name[4:]))


def kfold_pairs(parts: dict[str, list[Sample]]) -> list[tuple[list[Sample], list[Sample]]]:
    """(train, val) for each fold of a k-fold split: val is fold i, train the other folds."""
    names = sorted((n for n in parts if n.startswith("fold")), key=lambda n: int(n[4:]))
    if len(names) < 2:
        raise DataError(f"not a k-fold split: splits are {sorted(parts)}")
    return [
        ([s for other in names if other != name for s in parts[other]], list(parts[name]))
        for name in names
    ]


def crossing_groups(split: Split) -> dict[int, list[str]]:
    """Groups whose images sit in more than one split (leakage), with those split names."""
    where: dict[int, set[str]] = defaultdict(set)
    for name, members in split.items():
        for s in members:
            g = split.groups.get(s.path)
            if g is not None:
                where[g].add(name)
    return {g: sorted(names) for g, names in sorted(where.items()) if len(names) > 1}


# --------------------------------------------------------------------------- CSV


def save_split(
    split: dict[str, list[Sample]],
    path: str | Path,
    *,
    root: str | Path | None = None,
    groups: dict[Path, int] | None = None,
) -> Path:
    """Write a split as CSV (``path,image_id,Class,label,group,split``).

    Parameters
    ----------
    split
        A :class:`Split` (its groups are written) or any mapping of split name -> samples.
    path
        The CSV file to write.
    root
        Data folder: paths are written relative to it, so the file works on another machine.
        Without it, absolute paths are written.
    groups
        Group per sample path; defaults to ``split.groups`` (-1 where unknown).
    """
    out = Path(path)
    base = Path(root).resolve() if root is not None else None
    gmap = groups if groups is not None else getattr(split, "groups", {})
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SPLIT_COLUMNS)
        for name, members in split.items():
            if not _SPLIT_NAME.match(name):
                raise DataError(f"split name {name!r} is not train, val, test or foldN")
            for s in members:
                p = s.path.resolve()
                if base is not None:
                    try:
                        shown = p.relative_to(base).as_posix()
                    except ValueError:
                        raise DataError(f"{s.path}: not inside the data folder {base}") from None
                else:
                    shown = p.as_posix()
                w.writerow([shown, s.image_id, s.class_name, s.label, gmap.get(s.path, -1), name])
    return out


def load_split(
    path: str | Path, root: str | Path | None = None, classes: tuple[str, ...] = CLASSES
) -> Split:
    """Read a split CSV back into samples, checking it against the data.

    Parameters
    ----------
    path
        CSV written by :func:`save_split` (or by ``kidneyscan split``).
    root
        Data folder. When given, the folder is scanned and every row must be one of its images
        with the same class (the samples returned are the scanned ones, with sites); images of
        the folder that the split leaves out are counted in the log. Needed when the CSV has
        relative paths.
    classes
        Class names in label order.

    Returns
    -------
    Split
        Split name -> samples, with ``.groups`` from the CSV.

    Raises
    ------
    DataError
        Missing file or columns, unknown split name, label not matching the class, duplicate
        row, relative path without ``root``, or a row that is not an image of ``root``.
    """
    from kidneyscan.data.datasets import parse_index, scan_dataset

    csv_path = Path(path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: split file not found")
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in SPLIT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {missing}; expected {SPLIT_COLUMNS}")
        rows = list(reader)
    base = Path(root) if root is not None else None
    known: dict[Path, Sample] = {}
    if base is not None:
        known = {s.path.resolve(): s for s in scan_dataset(base, classes)}
    parts: dict[str, list[Sample]] = {}
    groups: dict[Path, int] = {}
    seen: dict[Path, int] = {}
    for i, row in enumerate(rows):
        where = f"{csv_path.name} line {i + 2}"
        name = row["split"].strip()
        if not _SPLIT_NAME.match(name):
            raise DataError(f"{where}: split {name!r} is not train, val, test or foldN")
        try:
            label = int(row["label"])
            group = int(row["group"])
        except ValueError:
            raise DataError(f"{where}: label and group must be integers") from None
        try:
            named = class_index(row["Class"], classes)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        if named != label:
            raise DataError(f"{where}: label {label} does not match class {row['Class']!r}")
        rel = Path(row["path"])
        if not rel.is_absolute() and base is None:
            raise DataError(f"{where}: relative path {row['path']!r}; pass the data folder (root)")
        full = (rel if rel.is_absolute() or base is None else base / rel).resolve()
        if full in seen:
            raise DataError(f"{where}: {row['path']!r} already listed on line {seen[full]}")
        seen[full] = i + 2
        if base is not None:
            if full not in known:
                reason = "file not found" if not full.is_file() else "not an image of the dataset"
                raise DataError(f"{where}: {row['path']!r}: {reason} under {base}")
            sample = known[full]
            if sample.label != label:
                raise DataError(
                    f"{where}: {row['path']!r} is {row['Class']!r} in the split but"
                    f" {sample.class_name!r} in the data"
                )
        else:
            if not full.is_file():
                raise DataError(f"{where}: {row['path']!r}: file not found")
            sample = Sample(
                full, label, classes[label], row["image_id"], parse_index(row["image_id"])
            )
        parts.setdefault(name, []).append(sample)
        groups[sample.path] = group
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    if known:
        left_out = len(known) - len(seen)
        if left_out:
            log.warning("%s: %d image(s) of %s are in no split", csv_path, left_out, base)
    split = Split(parts, groups, {"source": str(csv_path)})
    crossing = crossing_groups(split)
    if crossing:
        log.warning("%s: %d group(s) span more than one split (leakage)", csv_path, len(crossing))
    return split
