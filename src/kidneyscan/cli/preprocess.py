"""``kidneyscan preprocess bench`` and ``preprocess show``: the DIP suite from the shell."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kidneyscan.cli._app import app

preprocess_app = typer.Typer(
    help="Digital image processing: quality benchmark and before/after panels.",
    no_args_is_help=True,
)
app.add_typer(preprocess_app, name="preprocess")

DEFAULT_SHOW_STEPS = '[{"name": "restore_auto"}, {"name": "clahe", "clip_limit": 2.0}]'


@preprocess_app.command("bench")
def bench(
    n: int = typer.Option(40, "--n", min=2, help="Phantom slices for enhancement/segmentation."),
    image_size: int = typer.Option(256, "--image-size", min=32, help="Phantom side in pixels."),
    n_restore: int = typer.Option(
        6, "--n-restore", min=1, help="Slices (the first ones) for the slower restoration table."
    ),
    sites: int = typer.Option(3, "--sites", min=1, help="Phantom hospitals (noise/contrast)."),
    seed: int = typer.Option(0, "--seed", help="Seed of phantom and noise."),
    out: Path = typer.Option(
        Path("runs/preprocess-bench"), "--out", help="Output folder for tables, JSON and PNG."
    ),
) -> None:
    """Score every enhancement, restoration and segmentation method on phantom ground truth."""
    from rich.progress import Progress

    from kidneyscan.preprocess.bench import (
        NOISE_LEVELS,
        NOISE_LEVELS_HARD,
        BenchConfig,
        run_bench,
        write_outputs,
    )

    cfg = BenchConfig(
        n=n, image_size=image_size, n_restore=min(n_restore, n), sites=sites, seed=seed
    )
    totals = {
        "enhancement": cfg.n,
        "restoration": cfg.n_restore * (len(NOISE_LEVELS) + len(NOISE_LEVELS_HARD)),
        "segmentation": cfg.n,
    }
    with Progress() as bar:
        tasks = {k: bar.add_task(k, total=v) for k, v in totals.items()}
        results = run_bench(cfg, progress=lambda stage, k: bar.advance(tasks[stage], k))
    for path in write_outputs(cfg, results, out):
        typer.echo(f"wrote {path}")
    typer.echo((out / "bench.md").read_text())


@preprocess_app.command("show")
def show(
    image: Path = typer.Argument(..., help="Image file (PNG, JPEG or DICOM) to process."),
    steps: str = typer.Option(
        DEFAULT_SHOW_STEPS, "--steps", help="Pipeline steps as a JSON list of {name, ...}."
    ),
    out: Path = typer.Option(
        Path("runs/preprocess-show.png"), "--out", help="Where to write the PNG panel."
    ),
) -> None:
    """Write a before/after panel: the image, each pipeline step, and the kidney ROI found."""
    from kidneyscan.preprocess.show import show_panel

    try:
        parsed = json.loads(steps)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--steps is not valid JSON: {exc}") from exc
    if not isinstance(parsed, list) or not all(isinstance(s, dict) for s in parsed):
        raise typer.BadParameter('--steps must be a JSON list like [{"name": "clahe"}]')
    try:
        path = show_panel(image, parsed, out)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"wrote {path}")
