"""Central training and checkpoint evaluation runs: data -> split -> fit -> calibrate -> report.

The plain core behind ``kidneyscan train``, ``kidneyscan evaluate`` and the demo. A run folder
``runs/<name>/`` gets ``config.yaml``, ``split.csv`` (the exact split used), ``checkpoint/``
(weights + metadata), ``metrics.json``, ``val_metrics.json``, PNG plots and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from kidneyscan.config import ExperimentConfig, TrainConfig, save_config
from kidneyscan.data.datasets import CLASSES, DataError, Sample, scan_dataset
from kidneyscan.data.loaders import STONE_VS_NORMAL, class_counts, make_loader, task_samples
from kidneyscan.engine import FitResult, fit, predict, set_seed, softmax
from kidneyscan.evaluation.calibration import expected_calibration_error, fit_temperature
from kidneyscan.evaluation.metrics import classification_metrics
from kidneyscan.evaluation.report import write_report
from kidneyscan.models.factory import weights_provenance
from kidneyscan.preprocess.pipeline import Preprocessor

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


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
    from kidneyscan.models.factory import default_weights

    if cfg.weights is not None:
        return None if str(cfg.weights).lower() == "none" else cfg.weights
    if cfg.pretrained:
        return None
    return default_weights(cfg.model, **cfg.model_kwargs)


def input_width(cfg: ExperimentConfig) -> int:
    """The run's input width: ``cfg.image_width``, else 3:2 for the kidney band (its box is
    300 x 200 px of a 512 px slice), else the model's own aspect (square for most)."""
    from kidneyscan.models.factory import default_cfg

    if cfg.image_width is not None:
        return cfg.image_width
    if cfg.steps and cfg.steps[0].get("name") == "crop_kidney_band":
        return round(cfg.image_size * 1.5)
    try:
        kwargs = {**cfg.model_kwargs, "image_size": cfg.image_size}
        return int(default_cfg(cfg.model, **kwargs)["image_width"])
    except ValueError:
        return cfg.image_size


def build_model(cfg: ExperimentConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """Create the configured model and the ``{"name", "kwargs"}`` spec that rebuilds it.

    For the hybrid, the input size follows the run's, and without pretrained or local weights
    nothing is frozen (``freeze_fraction=0``) unless the config says otherwise: freezing a
    randomly initialised backbone would only cripple it. Weights default to the model's offline
    ones (:func:`run_weights`).
    """
    from kidneyscan.models.factory import create_classifier

    kwargs = dict(cfg.model_kwargs)
    weights = run_weights(cfg)
    if cfg.model == "hybrid":
        kwargs.setdefault("image_size", cfg.image_size)
        kwargs.setdefault("image_width", input_width(cfg))
        if not cfg.pretrained and not weights and "freeze_fraction" not in kwargs:
            kwargs["freeze_fraction"] = 0.0
            log.info("hybrid without pretrained weights: training the whole backbone")
    elif cfg.model in ("vit_b16", "swin_t") or cfg.model.startswith(("vit_", "swin")):
        # Transformers with fixed patch grids must be built for the run's input size.
        width = input_width(cfg)
        size = [cfg.image_size, width] if width != cfg.image_size else cfg.image_size
        kwargs.setdefault("img_size", size)
    if cfg.in_chans != 3:
        kwargs.setdefault("in_chans", cfg.in_chans)
    model = create_classifier(
        cfg.model, num_classes, pretrained=cfg.pretrained, weights=weights, **kwargs
    )
    spec = getattr(model, "kidneyscan_spec", None) or {"name": cfg.model, "kwargs": kwargs}
    return model, dict(spec)


def make_preprocessor(cfg: ExperimentConfig) -> Preprocessor:
    """The run's Preprocessor: config steps and size, normalisation from the model's data
    config (:func:`kidneyscan.models.factory.model_preprocessor`)."""
    from kidneyscan.models.factory import model_preprocessor

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
    from kidneyscan.data.splits import load_split, make_split, save_split

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
    from kidneyscan.models.frozen import FrozenSplit

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

    from kidneyscan.features import CachedFeatures, FeatureStore, bf16_supported

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

    def cached_logits(name: str) -> tuple[np.ndarray, np.ndarray]:
        # The model's own test-time flip (flip_tta) is the mean over the stored views.
        n_views = by_name[name].features.shape[1]
        views = range(n_views) if getattr(split.model, "flip_tta", False) else range(1)
        if getattr(split.model, "flip_tta", False) and n_views < 2:
            raise ValueError("the model averages a flipped view (flip_tta) but none is cached")
        outs = [
            predict(tail, by_name[name].loader(train=False, batch_size=eval_bs, view=v))
            for v in views
        ]
        return np.mean([o[0] for o in outs], axis=0).astype(np.float32), outs[0][1]

    return TrainingData(
        tail,
        train_feats.loader(train=True, batch_size=tc.batch_size, seed=tc.seed),
        by_name["val"].loader(train=False, batch_size=eval_bs),
        by_name["train"].loader(train=False, batch_size=eval_bs) if tc.smote else None,
        cached_logits,
        True,
        {
            "feature cache": str(store.folder),
            "cached at": f"{split.cut} ({split.n_frozen_modules} of {split.n_modules} modules)",
            "views": "+".join(store.views),
            "extraction": store.compute,
        },
        dataclasses.replace(tc, bf16=bf16_supported() if tc.bf16 is None else tc.bf16),
    )


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
    from kidneyscan.models.checkpoint import save_checkpoint

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


def write_predictions(
    path: str | Path, samples: Sequence[Sample], probs: np.ndarray, classes: Sequence[str]
) -> Path:
    """Per-image calibrated probabilities as CSV: ``path, label, predicted, p_<class>...``.

    Lets a reader find each misclassified slice, and lets benchmarks pool folds.
    """
    import csv

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


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "ece", "roc_auc_macro")
    out = {k: m.get(k) for k in keys}
    out["macro_f1"] = m["macro"]["f1"]
    if "stone_vs_rest" in m:
        out["stone_recall"] = m["stone_vs_rest"]["sensitivity"]
    return out


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
    from kidneyscan.models.checkpoint import load_checkpoint

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
    from kidneyscan.models.checkpoint import read_metadata

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
    import torch

    from kidneyscan.data.datasets import load_image
    from kidneyscan.models.checkpoint import read_metadata
    from kidneyscan.models.ensemble import EnsembleError, load_ensemble

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
    from kidneyscan.data.phantom import generate_dataset

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
