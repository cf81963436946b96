"""Classification metrics: per class, macro and weighted, ROC-AUC, ECE, stone-vs-rest, CIs.

Everything is computed with scikit-learn from integer labels and class probabilities, so the
numbers equal scikit-learn's by construction (a test checks it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from kidneyscan.evaluation.calibration import expected_calibration_error

STONE = "Stone"


def _check(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if p.ndim != 2 or p.shape[1] != k:
        raise ValueError(f"probs must be (N, {k}) for classes {list(classes)}, got {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must be ({p.shape[0]},), got {y.shape}")
    if len(y) == 0:
        raise ValueError("no samples to evaluate")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in 0..{k - 1}, got {sorted(set(y.tolist()))}")
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or infinity")
    return y, p


def macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """Macro-F1 of ``argmax(probs)`` over all columns of ``probs`` (for :func:`bootstrap_ci`)."""
    k = np.asarray(probs).shape[1]
    return float(
        f1_score(
            labels,
            np.asarray(probs).argmax(1),
            labels=list(range(k)),
            average="macro",
            zero_division=0,
        )
    )


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Accuracy of ``argmax(probs)``."""
    return float(accuracy_score(labels, np.asarray(probs).argmax(1)))


def class_recall(index: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """Metric function: recall (sensitivity) of class ``index`` (NaN when it is absent)."""

    def recall(labels: np.ndarray, probs: np.ndarray) -> float:
        y = np.asarray(labels)
        pos = y == index
        if not pos.any():
            return float("nan")
        return float((np.asarray(probs).argmax(1)[pos] == index).mean())

    return recall


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``metric_fn(labels, probs)``.

    Parameters
    ----------
    labels, probs
        Integer labels (N,) and probabilities (N, C).
    metric_fn
        ``f(labels, probs) -> float``; NaN results (e.g. a class absent from a resample) are
        dropped.
    n
        Number of resamples (with replacement, same size as the data).
    seed
        RNG seed.
    alpha
        1 - confidence level (0.05 gives a 95 % interval).

    Returns
    -------
    lo, hi
        Interval bounds (NaN, NaN when every resample was NaN).
    """
    y = np.asarray(labels)
    p = np.asarray(probs)
    if len(y) == 0:
        raise ValueError("no samples to bootstrap")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    vals = np.empty(n)
    for i in range(n):
        idx = rng.integers(0, len(y), len(y))
        vals[i] = metric_fn(y[idx], p[idx])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    # sklearn warns when a predicted class is absent from y_true (common on small test
    # splits); the value is still the mean recall over the classes present, as documented.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred))


def _auc(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    # ROC-AUC is undefined when only one class is present in y_true.
    if y_bin.min() == y_bin.max():
        return None
    return float(roc_auc_score(y_bin, score))


def classification_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, Any]:
    """All evaluation numbers for one prediction set, JSON-ready.

    Parameters
    ----------
    labels
        Integer labels (N,).
    probs
        Class probabilities (N, C), rows summing to 1 (e.g. temperature-scaled softmax).
    classes
        Class names in label order.
    n_bootstrap
        Resamples for 95 % confidence intervals (0 disables them).
    seed
        Bootstrap seed.
    n_bins
        Bins of the expected calibration error.

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``balanced_accuracy``, ``macro`` / ``weighted``
        (precision, recall, f1), ``per_class`` (name -> precision, recall, f1, support,
        roc_auc), ``confusion_matrix`` (rows = true, columns = predicted), ``roc_auc_macro``
        (one-vs-rest, over classes present), ``ece``, ``stone_vs_rest`` (when a ``Stone``
        class exists: sensitivity, specificity, precision, f1, roc_auc) and ``ci95``.
    """
    y, p = _check(labels, probs, classes)
    k = len(classes)
    pred = p.argmax(1)
    ids = list(range(k))
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=ids, zero_division=0)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "classes": list(classes),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": _balanced_accuracy(y, pred),
    }
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(
            y, pred, labels=ids, average=avg, zero_division=0
        )
        out[avg] = {"precision": float(pa), "recall": float(ra), "f1": float(fa)}
    per_class: dict[str, dict[str, Any]] = {}
    aucs = []
    for i, name in enumerate(classes):
        auc = _auc((y == i).astype(int), p[:, i])
        if auc is not None:
            aucs.append(auc)
        per_class[name] = {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(sup[i]),
            "roc_auc": auc,
        }
    out["per_class"] = per_class
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=ids).tolist()
    out["roc_auc_macro"] = float(np.mean(aucs)) if aucs else None
    out["ece"] = expected_calibration_error(p, y, n_bins=n_bins)
    out["nll"] = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
    if STONE in classes:
        out["stone_vs_rest"] = stone_vs_rest(y, p, list(classes).index(STONE))
    if n_bootstrap:
        ci: dict[str, list[float]] = {
            "accuracy": list(bootstrap_ci(y, p, accuracy, n=n_bootstrap, seed=seed)),
            "macro_f1": list(bootstrap_ci(y, p, macro_f1, n=n_bootstrap, seed=seed)),
        }
        if STONE in classes:
            ci["stone_recall"] = list(
                bootstrap_ci(
                    y, p, class_recall(list(classes).index(STONE)), n=n_bootstrap, seed=seed
                )
            )
        out["ci95"] = ci
    return out


def stone_vs_rest(labels: np.ndarray, probs: np.ndarray, stone_index: int) -> dict[str, Any]:
    """Binary stone detection view of a multi-class prediction.

    A slice counts as "stone predicted" when Stone is the arg-max class; the ROC-AUC uses the
    Stone probability as the score.
    """
    y = np.asarray(labels) == stone_index
    p = np.asarray(probs)
    pred = p.argmax(1) == stone_index
    tp = int((y & pred).sum())
    fn = int((y & ~pred).sum())
    fp = int((~y & pred).sum())
    tn = int((~y & ~pred).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    sens, ppv = ratio(tp, tp + fn), ratio(tp, tp + fp)
    f1 = 2 * sens * ppv / (sens + ppv) if sens and ppv else 0.0
    return {
        "tp": tp,
        "fn": fn,
        "fp": fp,
        "tn": tn,
        "sensitivity": sens,
        "specificity": ratio(tn, tn + fp),
        "precision": ppv,
        "f1": float(f1),
        "roc_auc": _auc(y.astype(int), p[:, stone_index]),
    }


def roc_curves(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """One-vs-rest ROC curves per class present (for plots): name -> {fpr, tpr, auc}."""
    y, p = _check(labels, probs, classes)
    curves: dict[str, Any] = {}
    for i, name in enumerate(classes):
        yb = (y == i).astype(int)
        auc = _auc(yb, p[:, i])
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(yb, p[:, i])
        curves[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": auc}
    return curves
