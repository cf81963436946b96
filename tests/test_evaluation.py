"""Evaluation: metrics equal scikit-learn's, ECE, temperature scaling, bootstrap, reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from kidneyscan.engine import softmax
from kidneyscan.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)
from kidneyscan.evaluation.metrics import (
    bootstrap_ci,
    class_recall,
    classification_metrics,
    macro_f1,
)
from kidneyscan.evaluation.report import compare_runs, write_report

CLASSES = ("Cyst", "Normal", "Stone", "Tumor")


def _random_predictions(n: int = 200, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.5  # better than chance, not perfect
    return labels, softmax(logits)


def test_metrics_equal_sklearn() -> None:
    # Prepare
    labels, probs = _random_predictions()
    pred = probs.argmax(1)
    # Execute
    m = classification_metrics(labels, probs, CLASSES, n_bootstrap=0)
    # Assert
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=[0, 1, 2, 3])
    for i, name in enumerate(CLASSES):
        c = m["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i])
        )
        assert c["roc_auc"] == pytest.approx(roc_auc_score(labels == i, probs[:, i]))
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["macro"]["f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert m["weighted"]["f1"] == pytest.approx(f1_score(labels, pred, average="weighted"))
    assert m["confusion_matrix"] == confusion_matrix(labels, pred).tolist()
    assert m["roc_auc_macro"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )
    assert m["ece"] == pytest.approx(expected_calibration_error(probs, labels))
    json.dumps(m)  # JSON-ready


def test_stone_vs_rest_view() -> None:
    labels = np.array([2, 2, 2, 0, 1, 3, 1])
    probs = np.full((7, 4), 0.1)
    pred = [2, 2, 0, 2, 1, 3, 1]  # TP, TP, FN, FP, TN, TN, TN
    probs[np.arange(7), pred] = 0.7
    sv = classification_metrics(labels, probs, CLASSES, n_bootstrap=0)["stone_vs_rest"]
    assert (sv["tp"], sv["fn"], sv["fp"], sv["tn"]) == (2, 1, 1, 3)
    assert sv["sensitivity"] == pytest.approx(2 / 3)
    assert sv["specificity"] == pytest.approx(3 / 4)
    assert sv["precision"] == pytest.approx(2 / 3)
    assert sv["roc_auc"] == pytest.approx(roc_auc_score(labels == 2, probs[:, 2]))


def test_binary_task_has_no_stone_view_without_stone_class() -> None:
    labels, probs = _random_predictions(k=2)
    m = classification_metrics(labels, probs, ("Cyst", "Tumor"), n_bootstrap=0)
    assert "stone_vs_rest" not in m
    m2 = classification_metrics(labels, probs, ("Normal", "Stone"), n_bootstrap=0)
    assert m2["stone_vs_rest"]["sensitivity"] == pytest.approx(m2["per_class"]["Stone"]["recall"])


def test_absent_class_gives_no_auc_not_a_crash() -> None:
    labels = np.array([0, 0, 1, 1, 3])
    probs = softmax(np.random.default_rng(0).normal(size=(5, 4)))
    m = classification_metrics(labels, probs, CLASSES, n_bootstrap=50)
    assert m["per_class"]["Stone"]["roc_auc"] is None
    assert m["per_class"]["Stone"]["support"] == 0
    assert m["stone_vs_rest"]["sensitivity"] is None
    assert all(np.isnan(m["ci95"]["stone_recall"]))


@pytest.mark.parametrize(
    ("labels", "probs", "match"),
    [
        (np.array([0, 1]), np.ones((2, 3)) / 3, r"\(N, 4\)"),
        (np.array([0, 5]), np.ones((2, 4)) / 4, "labels must lie"),
        (np.array([0]), np.ones((2, 4)) / 4, "labels must be"),
        (np.array([], dtype=int), np.ones((0, 4)), "no samples"),
        (np.array([0, 1]), np.full((2, 4), np.nan), "NaN"),
    ],
)
def test_metrics_reject_bad_input(labels: np.ndarray, probs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(labels, probs, CLASSES, n_bootstrap=0)


def test_ece_known_value_and_calibrated_case() -> None:
    # Two bins used: conf 0.9 (4 images, 3 correct) and 0.6 (2 images, 2 correct).
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 0])
    expected = 4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(expected)
    # Labels drawn from the predicted distribution are calibrated: small ECE.
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(size=(20000, 4)) * 2)
    y = np.array([rng.choice(4, p=row / row.sum()) for row in p.astype(np.float64)])
    assert expected_calibration_error(p, y) < 0.02
    bins = reliability_bins(p, y, n_bins=15)
    assert sum(bins["count"]) == 20000 and len(bins["edges"]) == 16


def test_temperature_recovers_known_scale() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5000, 4)) * 2
    p = softmax(base).astype(np.float64)
    y = np.array([rng.choice(4, p=row / row.sum()) for row in p])
    # Over-confident logits (x3) should get T close to 3 and lower NLL and ECE after scaling.
    t = fit_temperature(base * 3, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(base * 3, y, t) < nll(base * 3, y)
    assert expected_calibration_error(softmax(base * 3, t), y) < expected_calibration_error(
        softmax(base * 3), y
    )


def test_bootstrap_ci_brackets_estimate_and_shrinks() -> None:
    labels, probs = _random_predictions(n=400)
    est = macro_f1(labels, probs)
    lo, hi = bootstrap_ci(labels, probs, macro_f1, n=300, seed=0)
    assert lo < est < hi
    lo_s, hi_s = bootstrap_ci(labels[:50], probs[:50], macro_f1, n=300, seed=0)
    assert (hi_s - lo_s) > (hi - lo)
    assert bootstrap_ci(labels, probs, macro_f1, n=50, seed=3) == bootstrap_ci(
        labels, probs, macro_f1, n=50, seed=3
    )
    assert class_recall(2)(labels, probs) == pytest.approx(
        (probs.argmax(1)[labels == 2] == 2).mean()
    )


def test_write_report_and_compare(tmp_path: Path) -> None:
    labels, probs = _random_predictions()
    m = classification_metrics(labels, probs, CLASSES, n_bootstrap=100)
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "train_accuracy": 0.5,
            "val_loss": 1.1 / e,
            "val_accuracy": 0.4,
            "val_macro_f1": 0.3 + e / 10,
        }
        for e in (1.0, 2.0, 3.0)
    ]
    report = write_report(
        tmp_path / "run_a", m, history, labels=labels, probs=probs, summary={"model": "x"}
    )
    text = report.read_text()
    for png in ("confusion_matrix.png", "roc.png", "reliability.png", "training_curves.png"):
        assert (tmp_path / "run_a" / png).stat().st_size > 1000
        assert png in text
    assert "macro-F1" in text and "Stone vs rest" in text
    assert json.loads((tmp_path / "run_a" / "metrics.json").read_text())["n"] == 200
    write_report(tmp_path / "run_b", m)
    table = compare_runs([tmp_path / "run_a", tmp_path / "run_b"])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| run_a |")
    assert f"{m['macro']['f1']:.3f}" in lines[2]
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        compare_runs([tmp_path])
