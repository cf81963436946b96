"""Evaluating saved checkpoints: one model or a soft-voting ensemble, on a split or a folder.

Each checkpoint's Preprocessor is rebuilt from its metadata, so images go through exactly the
training-time preprocessing; reports use :func:`kidneyscan.evaluation.report.write_report`.
:mod:`kidneyscan.experiment` re-exports every name here.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kidneyscan.data.datasets import DataError, Sample, load_image, scan_dataset
from kidneyscan.data.loaders import make_loader, task_samples
from kidneyscan.engine import predict, softmax
from kidneyscan.evaluation.metrics import classification_metrics
from kidneyscan.evaluation.report import write_report
from kidneyscan.models.checkpoint import load_checkpoint, read_metadata
from kidneyscan.models.ensemble import EnsembleError, load_ensemble
from kidneyscan.preprocess.pipeline import Preprocessor
from kidneyscan.run_data import SPLITS, split_samples

__all__ = [
    "checkpoint_probs",
    "evaluate_checkpoint",
    "evaluate_ensemble",
    "select_eval_samples",
    "write_predictions",
]


def write_predictions(
    path: str | Path, samples: Sequence[Sample], probs: np.ndarray, classes: Sequence[str]
) -> Path:
    """Per-image calibrated probabilities as CSV: ``path, label, predicted, p_<class>...``.

    Lets a reader find each misclassified slice, and lets benchmarks pool folds.
    """
    p = Path(path)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "predicted", *(f"p_{c}" for c in classes)])
        for s, row in zip(samples, probs, strict=True):
            w.writerow(
                [str(s.path), classes[s.label], classes[int(np.argmax(row))]]
                + [f"{float(v):.6f}" for v in row]
            )
    return p


def checkpoint_probs(
    ckpt_dir: str | Path,
    samples: Sequence[Sample],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Temperature-scaled probabilities of a checkpoint on samples.

    The Preprocessor is rebuilt from the checkpoint's metadata, so images go through exactly
    the training-time preprocessing.

    Returns
    -------
    probs, labels, metadata
    """
    model, meta = load_checkpoint(ckpt_dir)
    pre = Preprocessor.from_dict(meta["preprocessing"])
    loader = make_loader(samples, pre, train=False, batch_size=batch_size, num_workers=num_workers)
    logits, labels = predict(model, loader, progress=progress)
    if logits.shape[1] != len(meta["classes"]):
        raise DataError(f"{ckpt_dir}: model gives {logits.shape[1]} outputs for {meta['classes']}")
    return softmax(logits, float(meta.get("temperature", 1.0))), labels, meta


def select_eval_samples(
    data: str | Path, task: str, split_file: str | Path | None, subset: str = "test"
) -> tuple[list[Sample], tuple[str, ...]]:
    """Samples to evaluate on: ``subset`` of a split file, or every image in ``data``."""
    if subset not in SPLITS:
        raise ValueError(f"subset must be one of {SPLITS}, got {subset!r}")
    if split_file is None:
        return task_samples(scan_dataset(data), task)
    parts, classes = split_samples(data, task, split_file)
    if not parts[subset]:
        raise DataError(f"{split_file}: no {subset!r} images for task {task}")
    return parts[subset], classes


def evaluate_checkpoint(
    ckpt_dir: str | Path,
    data: str | Path,
    *,
    split_file: str | Path | None = None,
    subset: str = "test",
    out_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a saved checkpoint on a dataset (all images, or one subset of a split file).

    Writes ``metrics.json``, plots and ``report.md`` to ``out_dir`` when given.
    """
    meta = read_metadata(ckpt_dir)
    task = meta.get("task", "multiclass")
    samples, classes = select_eval_samples(data, task, split_file, subset)
    if list(classes) != list(meta["classes"]):
        raise DataError(
            f"{ckpt_dir}: checkpoint classes {meta['classes']} differ from data classes "
            f"{list(classes)} for task {task}"
        )
    probs, labels, meta = checkpoint_probs(
        ckpt_dir, samples, batch_size=batch_size, progress=progress
    )
    metrics = classification_metrics(labels, probs, classes, n_bootstrap=n_bootstrap)
    metrics["temperature"] = float(meta.get("temperature", 1.0))
    metrics["checkpoint"] = str(Path(ckpt_dir).resolve())
    metrics["evaluated_split"] = subset if split_file is not None else "all"
    if out_dir is not None:
        write_report(
            out_dir,
            metrics,
            labels=labels,
            probs=probs,
            title=f"KidneyScan evaluation: {meta['model']['name']}",
            summary={
                "checkpoint": str(Path(ckpt_dir).resolve()),
                "data": str(Path(data).resolve()),
                "images": f"{len(samples)} ({metrics['evaluated_split']})",
                "task": task,
            },
        )
    return metrics


def evaluate_ensemble(
    checkpoints: Sequence[str | Path],
    data: str | Path,
    *,
    split_file: str | Path | None = None,
    subset: str = "test",
    weighted_by_f1: bool = False,
    out_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Evaluate a soft-voting ensemble of checkpoints (:mod:`kidneyscan.models.ensemble`).

    Members keep their own preprocessing and calibration temperature; with ``weighted_by_f1``
    each member is weighted by the validation macro-F1 stored in its metadata (never by test
    results).

    Returns
    -------
    dict
        Metrics of the ensemble plus ``ensemble`` (members, models, weights, each member's
        macro-F1 on the same images).
    """
    if len(checkpoints) < 1:
        raise ValueError("no checkpoints given")
    try:
        ens, info = load_ensemble(checkpoints, "val.macro_f1" if weighted_by_f1 else None)
    except EnsembleError as exc:
        raise DataError(str(exc)) from exc
    task = info.get("task") or "multiclass"
    samples, classes = select_eval_samples(data, task, split_file, subset)
    preps = [Preprocessor.from_dict(read_metadata(c)["preprocessing"]) for c in checkpoints]
    probs_l: list[np.ndarray] = []
    member_l: list[list[np.ndarray]] = [[] for _ in checkpoints]
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            images = [load_image(s.path) for s in samples[start : start + batch_size]]
            batches = [torch.stack([pre(img) for img in images]) for pre in preps]
            probs_l.append(ens.predict_proba(batches).float().numpy())
            for i, (member, b) in enumerate(zip(ens.members, batches, strict=True)):
                p = torch.softmax(member(b) / ens.temperatures[i], dim=-1)
                member_l[i].append(p.float().numpy())
    probs = np.concatenate(probs_l)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    metrics = classification_metrics(labels, probs, classes, n_bootstrap=n_bootstrap)
    metrics["evaluated_split"] = subset if split_file is not None else "all"
    metrics["ensemble"] = {
        "members": [str(Path(c).resolve()) for c in checkpoints],
        "models": [m["name"] for m in info["members"]],
        "weights": [float(m["weight"]) for m in info["members"]],
        "weighted_by_f1": weighted_by_f1,
        "member_macro_f1": [
            classification_metrics(labels, np.concatenate(p), classes, n_bootstrap=0)["macro"]["f1"]
            for p in member_l
        ],
    }
    if out_dir is not None:
        write_report(
            out_dir,
            metrics,
            labels=labels,
            probs=probs,
            title="KidneyScan soft-voting ensemble",
            summary={
                "members": ", ".join(metrics["ensemble"]["models"]),
                "weights": ", ".join(f"{w:.3f}" for w in metrics["ensemble"]["weights"]),
                "member macro-F1": ", ".join(
                    f"{f:.3f}" for f in metrics["ensemble"]["member_macro_f1"]
                ),
                "images": f"{len(samples)} ({metrics['evaluated_split']})",
            },
        )
    return metrics
