"""What a run trains on: the train / val / test split of a dataset, and its loaders.

:func:`split_samples` reads or makes the leakage-aware split for a task; :func:`training_data`
turns it into the loaders the epoch loop consumes (cached frozen-prefix features when the
model allows, else pixels). Central training (:mod:`kidneyscan.experiment`), distillation and
checkpoint evaluation (:mod:`kidneyscan.checkpoint_eval`) all split data through here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from kidneyscan.config import TrainConfig
from kidneyscan.data.datasets import CLASSES, DataError, Sample, scan_dataset
from kidneyscan.data.loaders import STONE_VS_NORMAL, make_loader, task_samples
from kidneyscan.data.splits import load_split, make_split, save_split
from kidneyscan.engine import predict
from kidneyscan.features import CachedFeatures, FeatureStore, bf16_supported, cached_logits
from kidneyscan.models.frozen import FrozenSplit
from kidneyscan.preprocess.pipeline import Preprocessor

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

__all__ = ["SPLITS", "TrainingData", "split_samples", "training_data"]


def split_samples(
    data: str | Path,
    task: str = "multiclass",
    split_file: str | Path | None = None,
    *,
    seed: int = 0,
    save_to: str | Path | None = None,
) -> tuple[dict[str, list[Sample]], tuple[str, ...]]:
    """Train / val / test samples of a dataset for a task.

    The split is always made on (or read for) the full four-class data, so one split file
    serves both tasks; the task's class selection is applied afterwards.

    Parameters
    ----------
    data
        Dataset folder.
    task
        ``multiclass`` or ``stone-vs-normal``.
    split_file
        A split CSV from :func:`kidneyscan.data.splits.save_split` (``kidneyscan split``);
        without it a leakage-aware stratified group split is made with
        :func:`kidneyscan.data.splits.make_split` (groups: patient IDs where known, otherwise
        index blocks + perceptual-hash clusters).
    seed
        Seed of a new split.
    save_to
        Where to save a new split (CSV with paths relative to ``data``).

    Returns
    -------
    parts, classes
        ``{"train", "val", "test"}`` sample lists (relabelled for the task) and class names.

    Raises
    ------
    DataError
        If the split file does not match the data, or train or val is empty for the task.
    """
    if split_file is not None:
        split = load_split(split_file, root=data)
    else:
        split = make_split(scan_dataset(data), seed=seed)
        if save_to is not None:
            save_split(split, save_to, root=data)
    parts: dict[str, list[Sample]] = {}
    classes: tuple[str, ...] = CLASSES
    for name in SPLITS:
        members = list(split.get(name, []))
        if task != "multiclass":
            members = [s for s in members if s.class_name in STONE_VS_NORMAL]
        parts[name], classes = task_samples(members, task) if members else ([], classes)
    if task != "multiclass":
        classes = STONE_VS_NORMAL
    for name in ("train", "val"):
        if not parts[name]:
            raise DataError(
                f"split has no {name!r} images for task {task} "
                f"(split file: {split_file or 'new split'})"
            )
    return parts, classes


@dataclass
class TrainingData:
    """What the epoch loop trains on, and how to get logits of a split afterwards.

    Attributes
    ----------
    model
        The module :func:`~kidneyscan.engine.fit` trains: the model itself on pixels, or its
        trainable tail (:class:`~kidneyscan.models.frozen.FrozenTail`) on cached features.
    train_loader, val_loader, smote_loader
        Loaders for :func:`~kidneyscan.engine.fit`.
    logits
        ``name -> (logits, labels)`` for ``"val"`` / ``"test"`` with the trained model.
    cached
        Whether training runs on cached frozen-prefix features.
    describe
        Facts for the report (feature cache, views).
    train
        The recipe with ``bf16`` resolved (``None`` means on for cached features where the
        CPU runs bf16 natively).
    """

    model: nn.Module
    train_loader: Any
    val_loader: Any
    smote_loader: Any
    logits: Any
    cached: bool
    describe: dict[str, Any]
    train: TrainConfig


def training_data(
    model: nn.Module,
    parts: dict[str, list[Sample]],
    pre: Preprocessor,
    tc: TrainConfig,
    *,
    num_classes: int,
    progress: bool = True,
    cache_root: str | Path | None = None,
) -> TrainingData:
    """Loaders for a run: cached frozen-prefix features when the model allows, else pixels.

    With ``tc.cache_features`` and a hybrid whose leading backbone modules are frozen, every
    image of every split goes through the frozen prefix once (stored on disk, see
    :mod:`kidneyscan.features`) and the epochs train only the tail; otherwise images are
    loaded, preprocessed and augmented every epoch.
    """
    split = None
    if tc.cache_features:
        try:
            split = FrozenSplit(model)
        except ValueError as exc:
            log.info("training on pixels (no cached features: %s)", exc)
    eval_bs = max(tc.batch_size, 32)
    if split is None:
        train_loader = make_loader(
            parts["train"],
            pre,
            train=True,
            batch_size=tc.batch_size,
            augment=tc.augment,
            balanced=tc.class_weighting == "sampler",
            seed=tc.seed,
            num_workers=tc.num_workers,
            num_classes=num_classes,
            cache=tc.cache_images,
        )
        eval_kw = {"num_workers": tc.num_workers, "cache": tc.cache_images}

        def pixel_loader(name: str) -> Any:
            return make_loader(parts[name], pre, train=False, batch_size=eval_bs, **eval_kw)  # type: ignore[arg-type]

        def pixel_logits(name: str) -> tuple[np.ndarray, np.ndarray]:
            return predict(model, pixel_loader(name))

        return TrainingData(
            model,
            train_loader,
            pixel_loader("val"),
            pixel_loader("train") if tc.smote else None,
            pixel_logits,
            False,
            {},
            dataclasses.replace(tc, bf16=bool(tc.bf16)),
        )

    store = FeatureStore(split, pre, root=cache_root, views=tc.feature_views)
    names = [n for n in SPLITS if parts.get(n)]
    everything = [s for n in names for s in parts[n]]
    feats = store.load(everything, progress=progress, desc="frozen features")
    bounds = np.cumsum([0] + [len(parts[n]) for n in names])
    by_name = {n: feats.subset(range(bounds[i], bounds[i + 1])) for i, n in enumerate(names)}
    train_feats = by_name["train"]
    if not tc.augment:
        # augment off: train on the original view only (the stored flips stay for TTA).
        train_feats = CachedFeatures(
            train_feats.features[:, :1], train_feats.labels, train_feats.rois, ["orig"]
        )
    tail = split.tail

    def by_name_logits(name: str) -> tuple[np.ndarray, np.ndarray]:
        return cached_logits(split, by_name[name], batch_size=eval_bs)

    return TrainingData(
        tail,
        train_feats.loader(train=True, batch_size=tc.batch_size, seed=tc.seed),
        by_name["val"].loader(train=False, batch_size=eval_bs),
        by_name["train"].loader(train=False, batch_size=eval_bs) if tc.smote else None,
        by_name_logits,
        True,
        {
            "feature cache": str(store.folder),
            "cached at": f"{split.cut} ({split.n_frozen_modules} of {split.n_modules} modules)",
            "views": "+".join(store.views),
            "extraction": store.compute,
        },
        dataclasses.replace(tc, bf16=bf16_supported() if tc.bf16 is None else tc.bf16),
    )
