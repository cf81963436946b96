"""Central training runs: data -> split -> fit -> calibrate -> report.

The plain core behind ``kidneyscan train`` and the demo; the split and loaders come from
:mod:`kidneyscan.run_data`, evaluation of saved checkpoints (``kidneyscan evaluate``) lives in
:mod:`kidneyscan.checkpoint_eval`, and both are re-exported here. A run folder
``runs/<name>/`` gets ``config.yaml``, ``split.csv`` (the exact split used), ``checkpoint/``
(weights + metadata), ``metrics.json``, ``val_metrics.json``, PNG plots and ``report.md``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from kidneyscan.checkpoint_eval import (  # re-exported: callers import them from here
    checkpoint_probs,
    evaluate_checkpoint,
    evaluate_ensemble,
    select_eval_samples,
    write_predictions,
)
from kidneyscan.config import ExperimentConfig, TrainConfig, save_config
from kidneyscan.data.datasets import CLASSES
from kidneyscan.data.loaders import class_counts
from kidneyscan.data.phantom import generate_dataset
from kidneyscan.engine import FitResult, fit, set_seed, softmax
from kidneyscan.evaluation.calibration import expected_calibration_error, fit_temperature
from kidneyscan.evaluation.metrics import classification_metrics
from kidneyscan.evaluation.report import write_report
from kidneyscan.models.checkpoint import save_checkpoint
from kidneyscan.models.factory import (
    create_classifier,
    default_cfg,
    default_weights,
    model_entry,
    model_preprocessor,
    weights_provenance,
)
from kidneyscan.preprocess.pipeline import Preprocessor
from kidneyscan.run_data import (  # re-exported: callers import them from here
    SPLITS,
    TrainingData,
    split_samples,
    training_data,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a central training run produced.

    Attributes
    ----------
    run_dir, checkpoint_dir, report_path
        Output locations.
    metrics
        Test metrics (temperature-scaled probabilities), as in ``metrics.json``.
    val_metrics
        Validation metrics (same form).
    fit
        The :class:`~kidneyscan.engine.FitResult`.
    temperature
        Temperature fitted on the validation split.
    """

    run_dir: Path
    checkpoint_dir: Path
    report_path: Path
    metrics: dict[str, Any]
    val_metrics: dict[str, Any]
    fit: FitResult
    temperature: float


def run_weights(cfg: ExperimentConfig) -> str | None:
    """The weights a run starts from: ``cfg.weights``, else the model's offline default.

    ``weights: none`` asks for random initialisation explicitly.
    """
    if cfg.weights is not None:
        return None if str(cfg.weights).lower() == "none" else cfg.weights
    if cfg.pretrained:
        return None
    return default_weights(cfg.model, **cfg.model_kwargs)


#: Pipeline steps that crop to the kidney band (its 3:2 box), plain or with the rest masked.
BAND_STEPS = ("crop_kidney_band", "crop_kidney_band_masked")


def input_width(cfg: ExperimentConfig) -> int:
    """The run's input width: ``cfg.image_width``, else 3:2 for the kidney band (its box is
    300 x 200 px of a 512 px slice), else the model's own aspect (square for most)."""
    if cfg.image_width is not None:
        return cfg.image_width
    if cfg.steps and cfg.steps[0].get("name") in BAND_STEPS:
        return round(cfg.image_size * 1.5)
    try:
        kwargs = {**cfg.model_kwargs, "image_size": cfg.image_size}
        return int(default_cfg(cfg.model, **kwargs)["image_width"])
    except ValueError:
        return cfg.image_size


def model_kwargs(cfg: ExperimentConfig) -> tuple[dict[str, Any], str | None]:
    """The architecture keyword arguments of the configured model and its starting weights.

    For the hybrid, the input size follows the run's, and without pretrained or local weights
    nothing is frozen (``freeze_fraction=0``) unless the config says otherwise: freezing a
    randomly initialised backbone would only cripple it. Weights default to the model's offline
    ones (:func:`run_weights`). Central and federated training both build models from this.
    """
    kwargs = dict(cfg.model_kwargs)
    weights = run_weights(cfg)
    entry = model_entry(cfg.model)
    # The model declares how the input size reaches it (hybrid: image_size / image_width;
    # ViT / Swin: img_size; CNNs: not at all) and what to freeze without starting weights.
    for key, value in entry.input_kwargs(cfg.image_size, input_width(cfg)).items():
        kwargs.setdefault(key, value)
    if "freeze_fraction" not in kwargs:
        policy = entry.freeze_kwargs(has_weights=bool(cfg.pretrained or weights))
        if policy:
            kwargs.update(policy)
            log.info("%s without pretrained weights: training the whole backbone", cfg.model)
    if cfg.in_chans != 3:
        kwargs.setdefault("in_chans", cfg.in_chans)
    return kwargs, weights


def build_model(cfg: ExperimentConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """Create the configured model (:func:`model_kwargs`) and the ``{"name", "kwargs"}`` spec
    that rebuilds it."""
    kwargs, weights = model_kwargs(cfg)
    model = create_classifier(
        cfg.model, num_classes, pretrained=cfg.pretrained, weights=weights, **kwargs
    )
    spec = getattr(model, "kidneyscan_spec", None) or {"name": cfg.model, "kwargs": kwargs}
    return model, dict(spec)


def make_preprocessor(cfg: ExperimentConfig) -> Preprocessor:
    """The run's Preprocessor: config steps and size, normalisation from the model's data
    config (:func:`kidneyscan.models.factory.model_preprocessor`)."""
    return model_preprocessor(
        cfg.model,
        cfg.model_kwargs,
        steps=list(cfg.steps),
        image_size=cfg.image_size,
        image_width=input_width(cfg),
        in_chans=cfg.in_chans,
    )


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _metrics_for(
    logits: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    temperature: float,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    probs = softmax(logits, temperature)
    m = classification_metrics(labels, probs, classes, n_bootstrap=n_bootstrap, seed=seed)
    m["temperature"] = temperature
    m["ece_uncalibrated"] = expected_calibration_error(softmax(logits), labels)
    return m


def train_central(
    data: str | Path,
    out_dir: str | Path,
    cfg: ExperimentConfig,
    *,
    split_file: str | Path | None = None,
    progress: bool = True,
    n_bootstrap: int = 1000,
    title: str | None = None,
) -> RunResult:
    """Train one model centrally and write the whole run folder.

    Parameters
    ----------
    data
        Dataset folder (CT-KIDNEY layout or ImageFolder tree).
    out_dir
        Run folder (``runs/<name>``); created.
    cfg
        Model, input, task and training recipe.
    split_file
        A saved split CSV; without it a new leakage-aware split is made and saved as
        ``split.csv`` in the run folder.
    progress
        Show progress bars.
    n_bootstrap
        Bootstrap resamples for the confidence intervals.
    title
        Report heading.

    Returns
    -------
    RunResult
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tc = cfg.train
    set_seed(tc.seed)
    split_path = out / "split.csv" if split_file is None else Path(split_file).resolve()
    parts, classes = split_samples(
        data, cfg.task, split_file, seed=tc.seed, save_to=split_path if split_file is None else None
    )
    k = len(classes)
    counts = {name: class_counts(parts[name], k).tolist() for name in SPLITS}
    log.info("split sizes %s", {n: len(v) for n, v in parts.items()})

    pre = make_preprocessor(cfg)
    model, spec = build_model(cfg, k)
    provenance = weights_provenance(model)
    t_data = time.perf_counter()
    td = training_data(model, parts, pre, tc, num_classes=k, progress=progress)
    feature_seconds = time.perf_counter() - t_data

    t0 = time.perf_counter()
    result = fit(
        td.model,
        td.train_loader,
        td.val_loader,
        td.train,
        classes=classes,
        out_dir=out,
        progress=progress,
        smote_loader=td.smote_loader,
    )
    train_seconds = time.perf_counter() - t0

    val_logits, val_labels = td.logits("val")
    temperature = fit_temperature(val_logits, val_labels)
    val_metrics = _metrics_for(val_logits, val_labels, classes, temperature, 0, tc.seed)
    if parts["test"]:
        test_logits, test_labels = td.logits("test")
        eval_split = "test"
    else:
        log.warning("split has no test images: reporting validation metrics (optimistic)")
        test_logits, test_labels, eval_split = val_logits, val_labels, "val"
    metrics = _metrics_for(test_logits, test_labels, classes, temperature, n_bootstrap, tc.seed)
    metrics["evaluated_split"] = eval_split

    summary = {
        "model": spec["name"],
        "parameters": param_count(model),
        "trainable parameters": param_count(model, trainable_only=True),
        "task": cfg.task,
        "input (h x w)": f"{pre.input_size[0]} x {pre.input_size[1]}",
        "preprocessing": ", ".join(st["name"] for st in pre.steps) or "none",
        "weights": (provenance or {}).get("source", "none (random initialisation)"),
        "data": str(Path(data).resolve()),
        "split file": str(split_path),
        "train / val / test images": " / ".join(str(len(parts[s])) for s in SPLITS),
        "epochs run (best)": f"{len(result.history)} ({result.best_epoch})",
        "stopped early": result.stopped_early,
        "training time (s)": round(train_seconds, 1),
        "feature extraction (s)": round(feature_seconds, 1) if td.cached else "n/a (pixels)",
        "temperature": temperature,
        **td.describe,
    }
    training_summary = {
        "config": cfg.to_dict(),
        "split_sizes": {s: len(parts[s]) for s in SPLITS},
        "class_counts": counts,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "best_val_macro_f1": result.best_val_macro_f1,
        "stopped_early": result.stopped_early,
        "train_seconds": train_seconds,
        "feature_seconds": feature_seconds if td.cached else None,
        "bf16": td.train.bf16,
        "cached_features": td.describe or None,
        "smote": result.smote,
        "parameters": param_count(model),
        "trainable_parameters": param_count(model, trainable_only=True),
    }
    ckpt = save_checkpoint(
        out / "checkpoint",
        model,
        {
            "model": spec,
            "classes": list(classes),
            "preprocessing": pre.to_dict(),
            "temperature": temperature,
            "metrics": {"test": _headline(metrics), "val": _headline(val_metrics)},
            "split_file": str(split_path),
            "task": cfg.task,
            "training": training_summary,
            "input_size": [cfg.in_chans, *pre.input_size],
            "normalisation": {"mean": list(pre.mean), "std": list(pre.std)},
            "backbone_weights": provenance,
        },
    )
    (out / "val_metrics.json").write_text(json.dumps(val_metrics, indent=2))
    write_predictions(
        out / "predictions.csv",
        parts[eval_split],
        softmax(test_logits, temperature),
        classes,
    )
    (out / "training.json").write_text(json.dumps(training_summary, indent=2, default=str))
    notes = [
        "## How this was measured",
        "",
        f"Probabilities are temperature-scaled (T = {temperature:.3f}, fitted on the validation "
        f"split by NLL); ECE before scaling: {metrics['ece_uncalibrated']:.3f}. The model was "
        f"selected at the epoch of best validation macro-F1; the {eval_split} split was not "
        "used for any choice. Confidence intervals: percentile bootstrap over images "
        f"({n_bootstrap} resamples); images of one patient are correlated, so they are "
        "optimistic.",
    ]
    if result.smote:
        notes += ["", f"SMOTE head refit: `{json.dumps(result.smote)}`"]
    report = write_report(
        out,
        metrics,
        result.history,
        labels=test_labels,
        probs=softmax(test_logits, temperature),
        title=title or f"KidneyScan run: {spec['name']} ({cfg.task})",
        summary=summary,
        notes=notes,
    )
    return RunResult(out, ckpt, report, metrics, val_metrics, result, temperature)


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "ece", "roc_auc_macro")
    out = {k: m.get(k) for k in keys}
    out["macro_f1"] = m["macro"]["f1"]
    if "stone_vs_rest" in m:
        out["stone_recall"] = m["stone_vs_rest"]["sensitivity"]
    return out


def demo_config(image_size: int = 64, epochs: int = 6, seed: int = 0) -> ExperimentConfig:
    """The demo's small hybrid config: convnext_atto backbone, 1 encoder block, 128-d tokens."""
    return ExperimentConfig(
        model="hybrid",
        model_kwargs={"backbone": "convnext_atto", "embed_dim": 128, "depth": 1, "num_heads": 8},
        image_size=image_size,
        train=TrainConfig(
            epochs=epochs,
            batch_size=32,
            lr=1e-3,
            warmup_epochs=1,
            seed=seed,
            early_stopping_patience=4,
            cache_images=True,
        ),
    )


def demo_central(
    out_dir: str | Path,
    *,
    n: int = 320,
    image_size: int = 64,
    epochs: int = 6,
    seed: int = 0,
    sites: int = 3,
    progress: bool = True,
) -> RunResult:
    """Generate a phantom, then train and evaluate the hybrid centrally into ``out_dir``.

    The phantom goes to ``<out_dir>/data`` (reused when already there with the same size),
    the checkpoint to ``<out_dir>/checkpoint``.
    """
    out = Path(out_dir)
    data = out / "data"
    stamp = data / ".demo.json"
    want = {"n": n, "seed": seed, "sites": sites, "image_size": max(64, image_size)}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        generate_dataset(
            data, n, seed=seed, sites=sites, image_size=want["image_size"], progress=progress
        )
        stamp.write_text(json.dumps(want))
    return train_central(
        data,
        out,
        demo_config(image_size, epochs, seed),
        progress=progress,
        title="KidneyScan demo: hybrid ConvNeXt + Transformer on the synthetic phantom",
    )


__all__ = [
    "CLASSES",
    "SPLITS",
    "TrainingData",
    "make_preprocessor",
    "param_count",
    "training_data",
    "write_predictions",
    "RunResult",
    "build_model",
    "demo_central",
    "evaluate_ensemble",
    "checkpoint_probs",
    "evaluate_checkpoint",
    "select_eval_samples",
    "split_samples",
    "train_central",
]
