"""Run reports: ``metrics.json``, PNG plots and a Markdown ``report.md`` in a run folder."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kidneyscan.evaluation.calibration import reliability_bins
from kidneyscan.evaluation.metrics import roc_curves


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> Path:
    """Confusion matrix heat map (rows true, columns predicted) with counts and row percentages."""
    plt = _plt()
    m = np.asarray(cm, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.2, 1.1 * k + 1.6))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}\n{frac[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.6 else "black",
                fontsize=9,
            )
    ax.set_xticks(range(k), classes)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised colour)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """One-vs-rest ROC curves per class, AUC in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for name, c in roc_curves(labels, probs, classes).items():
        ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {c['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC, one-vs-rest")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(labels: np.ndarray, probs: np.ndarray, path: Path, n_bins: int = 15) -> Path:
    """Reliability diagram: accuracy vs confidence per bin, with the bin counts below."""
    plt = _plt()
    b = reliability_bins(probs, labels, n_bins)
    edges = np.asarray(b["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    acc = np.nan_to_num(np.asarray(b["accuracy"], dtype=np.float64))
    count = np.asarray(b["count"])
    width = edges[1] - edges[0]
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(5, 5.4), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    conf = np.asarray(b["confidence"], dtype=np.float64)
    full = count > 0
    ax.bar(centres[full], acc[full], width=width, edgecolor="k", alpha=0.8, label="accuracy")
    # The gap to the bin's mean confidence is what ECE sums: show it even when accuracy is 0.
    ax.bar(
        centres[full],
        conf[full] - acc[full],
        bottom=acc[full],
        width=width,
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], ls="--", c="grey", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Reliability diagram (top-label)")
    ax.legend(loc="upper left", fontsize=8)
    ax2.bar(centres, count, width=width, color="grey")
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("images")
    ax2.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(history: Sequence[dict[str, float]], path: Path) -> Path:
    """Training curves: train/val loss and train accuracy / val accuracy / val macro-F1."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    a1.plot(ep, [h["val_loss"] for h in history], "o-", label="val loss")
    a1.set_xlabel("epoch")
    a1.set_title("loss")
    a1.legend()
    a2.plot(ep, [h["train_accuracy"] for h in history], "o-", label="train accuracy")
    a2.plot(ep, [h["val_accuracy"] for h in history], "o-", label="val accuracy")
    a2.plot(ep, [h["val_macro_f1"] for h in history], "o-", label="val macro-F1")
    a2.set_ylim(0, 1)
    a2.set_xlabel("epoch")
    a2.set_title("accuracy / F1")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 10000:
        return f"{x:,}"
    return str(x)


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """Markdown tables of a :func:`classification_metrics` result."""
    lines = []
    ci = metrics.get("ci95", {})

    def with_ci(key: str, value: float) -> str:
        if key in ci and not any(math.isnan(v) for v in ci[key]):
            return f"{value:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]"
        return _fmt(value)

    lines += [
        "| metric | value (95 % bootstrap CI) |",
        "|---|---|",
        f"| images | {metrics['n']} |",
        f"| accuracy | {with_ci('accuracy', metrics['accuracy'])} |",
        f"| macro-F1 | {with_ci('macro_f1', metrics['macro']['f1'])} |",
        f"| weighted F1 | {_fmt(metrics['weighted']['f1'])} |",
        f"| balanced accuracy | {_fmt(metrics['balanced_accuracy'])} |",
        f"| macro ROC-AUC (one-vs-rest) | {_fmt(metrics.get('roc_auc_macro'))} |",
        f"| ECE (15 bins) | {_fmt(metrics['ece'])} |",
        f"| NLL | {_fmt(metrics.get('nll'))} |",
    ]
    if "temperature" in metrics:
        lines.append(f"| temperature (fitted on validation) | {_fmt(metrics['temperature'])} |")
    lines += [
        "",
        "| class | precision | recall | F1 | ROC-AUC | support |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in metrics["per_class"].items():
        lines.append(
            f"| {name} | {_fmt(c['precision'])} | {_fmt(c['recall'])} | {_fmt(c['f1'])} | "
            f"{_fmt(c['roc_auc'])} | {c['support']} |"
        )
    sv = metrics.get("stone_vs_rest")
    if sv:
        rec = _fmt(sv["sensitivity"])
        if "stone_recall" in ci and not any(math.isnan(v) for v in ci["stone_recall"]):
            rec += f" [{ci['stone_recall'][0]:.3f}, {ci['stone_recall'][1]:.3f}]"
        lines += [
            "",
            "**Stone vs rest** (stone = arg-max class):",
            "",
            "| sensitivity | specificity | precision | F1 | ROC-AUC | TP / FN / FP / TN |",
            "|---|---|---|---|---|---|",
            f"| {rec} | {_fmt(sv['specificity'])} | {_fmt(sv['precision'])} | {_fmt(sv['f1'])} | "
            f"{_fmt(sv['roc_auc'])} | {sv['tp']} / {sv['fn']} / {sv['fp']} / {sv['tn']} |",
        ]
    return "\n".join(lines)


def write_report(
    run_dir: str | Path,
    metrics: dict[str, Any],
    history: Sequence[dict[str, float]] | None = None,
    *,
    labels: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    title: str = "KidneyScan run",
    summary: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``metrics.json``, PNG plots and ``report.md`` into ``run_dir``.

    Parameters
    ----------
    run_dir
        Output folder (created).
    metrics
        A :func:`~kidneyscan.evaluation.metrics.classification_metrics` result (extra keys are
        kept in ``metrics.json``).
    history
        Per-epoch rows from :class:`kidneyscan.engine.FitResult` (training-curve plot).
    labels, probs
        Test labels and probabilities: needed for the ROC and reliability plots.
    title
        Report heading.
    summary
        Key/value facts listed at the top (model, data, split, timings...).
    notes
        Extra Markdown paragraphs appended at the end.

    Returns
    -------
    Path
        The ``report.md`` path.
    """
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    classes = metrics["classes"]
    plots: list[tuple[str, str]] = []
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png")
    plots.append(("Confusion matrix", "confusion_matrix.png"))
    if labels is not None and probs is not None:
        plot_roc(labels, probs, classes, out / "roc.png")
        plot_reliability(labels, probs, out / "reliability.png")
        plots += [("ROC curves", "roc.png"), ("Reliability diagram", "reliability.png")]
    if history:
        (out / "history.json").write_text(json.dumps(list(history), indent=2))
        plot_history(history, out / "training_curves.png")
        plots.append(("Training curves", "training_curves.png"))
    md = [f"# {title}", ""]
    if summary:
        md += ["| | |", "|---|---|"]
        md += [f"| {k} | {_fmt(v)} |" for k, v in summary.items()]
        md.append("")
    md += ["## Test metrics", "", metrics_markdown(metrics), ""]
    for caption, name in plots:
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
    md += list(notes)
    md.append("\n*Research use only: not a medical device; do not use for diagnosis.*")
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def compare_runs(run_dirs: Sequence[str | Path]) -> str:
    """One Markdown table comparing run folders (or evaluation folders) by their metrics.

    Columns: run, model, task, test images, accuracy, macro-F1 (95 % CI), stone recall, ECE,
    macro ROC-AUC, parameters, training time. Missing values show as ``n/a``.

    Raises
    ------
    FileNotFoundError
        If a folder has no ``metrics.json``.
    """
    if not run_dirs:
        raise ValueError("no run folders given")
    header = (
        "| run | model | task | images | accuracy | macro-F1 [95 % CI] | stone recall | ECE | "
        "ROC-AUC | parameters | train time (s) |"
    )
    lines = [header, "|" + "---|" * 11]
    for d in run_dirs:
        d = Path(d)
        mfile = d / "metrics.json"
        if not mfile.is_file():
            raise FileNotFoundError(f"{d}: no metrics.json (not a run folder)")
        m = json.loads(mfile.read_text())
        training: dict[str, Any] = {}
        if (d / "training.json").is_file():
            training = json.loads((d / "training.json").read_text())
        meta: dict[str, Any] = {}
        if (d / "checkpoint" / "metadata.json").is_file():
            meta = json.loads((d / "checkpoint" / "metadata.json").read_text())
        model = meta.get("model", {}).get("name") or ", ".join(
            m.get("ensemble", {}).get("models", [])
        )
        f1 = m["macro"]["f1"]
        ci = m.get("ci95", {}).get("macro_f1")
        f1s = f"{f1:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        sv = m.get("stone_vs_rest", {})
        params = training.get("parameters")
        secs = training.get("train_seconds")
        lines.append(
            f"| {d.name} | {model or 'n/a'} | {meta.get('task', 'n/a')} | {m['n']} | "
            f"{m['accuracy']:.3f} | {f1s} | {_fmt(sv.get('sensitivity'))} | {m['ece']:.3f} | "
            f"{_fmt(m.get('roc_auc_macro'))} | "
            f"{f'{params / 1e6:.2f} M' if params else 'n/a'} | "
            f"{f'{secs:.0f}' if secs is not None else 'n/a'} |"
        )
    return "\n".join(lines)
