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

Modules: :mod:`kidneyscan.data.grouping` (the groups), :mod:`kidneyscan.data.split_files`
(:class:`Split` and its CSV), this one (assigning groups to splits). The names of both are
re-exported here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import combinations
from math import comb
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from kidneyscan.data.datasets import CLASSES, DataError, Sample, class_index
from kidneyscan.data.grouping import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MAX_GAP,
    DEFAULT_MAX_JUMP,
    GROUPINGS,
    compute_phashes,
    groups_for,
    hamming_pairs,
    index_bands,
    index_blocks,
    phash,
    phash_clusters,
    renumber,
    resolve_grouping,
)
from kidneyscan.data.split_files import (
    SPLIT_COLUMNS,
    Split,
    crossing_groups,
    load_split,
    save_split,
)

log = logging.getLogger(__name__)


#: Above this many (test, val) fold combinations, folds are picked greedily.
MAX_FOLD_CHOICES = 5000


def _assign_folds(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Fold id per sample from StratifiedGroupKFold (whole groups, class mix balanced)."""
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
    groups = renumber([(s.label, int(b)) for s, b in zip(samples, bands, strict=True)])
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


__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "DEFAULT_MAX_GAP",
    "DEFAULT_MAX_JUMP",
    "GROUPINGS",
    "MAX_FOLD_CHOICES",
    "SPLIT_COLUMNS",
    "Split",
    "compute_phashes",
    "crossing_groups",
    "groups_for",
    "hamming_pairs",
    "index_bands",
    "index_blocks",
    "kfold_pairs",
    "load_split",
    "make_kfold",
    "make_split",
    "phash",
    "phash_clusters",
    "resolve_grouping",
    "save_split",
]
