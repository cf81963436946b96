"""PyTorch datasets and loaders over :class:`~kidneyscan.data.datasets.Sample` lists.

Every image goes ``load_image`` -> ``Preprocessor.image`` (DIP steps + resize) -> augmentation
(training only) -> ``Preprocessor.to_tensor`` (channels + normalisation), so training,
evaluation and serving share one preprocessing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from kidneyscan.data.augment import build_augmentation
from kidneyscan.data.datasets import CLASSES, DataError, Sample, load_image
from kidneyscan.preprocess.pipeline import Preprocessor

#: Classes of the binary task, in label order.
STONE_VS_NORMAL: tuple[str, ...] = ("Normal", "Stone")


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples -> (normalised (C, S, S) tensor, label).

    Parameters
    ----------
    samples
        The images and labels.
    preprocessor
        The run's preprocessing.
    transform
        Optional augmentation applied to the resized (1, S, S) image in [0, 1].
    cache
        Keep each preprocessed (S, S) image in memory after its first load, so later epochs
        skip decoding and the DIP steps (S * S * 4 bytes per image; augmentation still runs
        every time).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocessor: Preprocessor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.preprocessor = preprocessor
        self.transform = transform
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples[i]
        if self._cache is not None and i in self._cache:
            img = self._cache[i]
        else:
            img = self.preprocessor.image(load_image(s.path))
            if self._cache is not None:
                self._cache[i] = img
        if self.transform is not None:
            t = self.transform(torch.from_numpy(img)[None])
            img = t[0].numpy()
        return self.preprocessor.to_tensor(img), int(s.label)

    @property
    def labels(self) -> np.ndarray:
        """Integer labels of all samples (no image loading)."""
        return np.array([s.label for s in self.samples], dtype=np.int64)


def class_counts(samples: Sequence[Sample], num_classes: int) -> np.ndarray:
    """Number of samples per label, length ``num_classes``.

    Raises
    ------
    DataError
        If a label lies outside ``0..num_classes-1``.
    """
    labels = np.array([s.label for s in samples], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels outside 0..{num_classes - 1}: {sorted(set(labels.tolist()))}")
    return np.bincount(labels, minlength=num_classes)


def make_loader(
    samples: Sequence[Sample],
    preprocessor: Preprocessor,
    *,
    train: bool,
    batch_size: int,
    augment: bool = False,
    balanced: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    num_classes: int | None = None,
    cache: bool = False,
) -> DataLoader:
    """Build a DataLoader yielding ``(x float32 (B, C, S, S), y int64 (B,))``.

    Parameters
    ----------
    samples
        Images and labels.
    preprocessor
        The run's preprocessing (steps, resize, channels, normalisation).
    train
        Shuffle (or balanced-sample) and drop nothing; evaluation loaders keep file order.
    batch_size
        Mini-batch size.
    augment
        Apply :func:`kidneyscan.data.augment.build_augmentation`; only honoured when ``train``.
    balanced
        Sample classes with equal probability (with replacement); only when ``train``.
    seed
        Seeds the shuffle order, the balanced sampler and the worker RNGs.
    num_workers
        DataLoader worker processes.
    num_classes
        Number of classes for balanced sampling (default: largest label + 1).
    cache
        Keep preprocessed images in memory (see :class:`ImageDataset`); with worker processes
        each worker holds its own cache.

    Raises
    ------
    DataError
        If ``samples`` is empty.
    """
    if not samples:
        raise DataError("cannot build a data loader from an empty sample list")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    transform = None
    if train and augment:
        transform = build_augmentation()
    ds = ImageDataset(samples, preprocessor, transform, cache=cache)
    gen = torch.Generator().manual_seed(int(seed))
    sampler = None
    shuffle = train
    if train and balanced:
        labels = ds.labels
        k = num_classes or int(labels.max()) + 1
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        weights = 1.0 / counts[labels]
        sampler = WeightedRandomSampler(
            weights.tolist(),
            num_samples=len(ds),
            replacement=True,
            generator=gen,
        )
        shuffle = False
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        generator=gen,
        persistent_workers=False,
        drop_last=False,
    )


def task_samples(
    samples: Sequence[Sample], task: str = "multiclass"
) -> tuple[list[Sample], tuple[str, ...]]:
    """Select and relabel samples for a task.

    Parameters
    ----------
    samples
        Samples labelled with the four CT-KIDNEY classes.
    task
        ``multiclass`` keeps everything; ``stone-vs-normal`` keeps Normal (label 0) and Stone
        (label 1) images only.

    Returns
    -------
    samples, classes
        The selected samples and the class names in label order.
    """
    if task == "multiclass":
        return list(samples), CLASSES
    if task == "stone-vs-normal":
        keep = [s for s in samples if s.class_name in STONE_VS_NORMAL]
        out = [dataclasses.replace(s, label=STONE_VS_NORMAL.index(s.class_name)) for s in keep]
        if not out:
            raise DataError("task stone-vs-normal: no Normal or Stone images in the data")
        return out, STONE_VS_NORMAL
    raise ValueError(f"unknown task {task!r}; expected 'multiclass' or 'stone-vs-normal'")
