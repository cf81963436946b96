"""CLI commands of the phantom area: ``kidneyscan phantom`` and ``kidneyscan eda``."""

from __future__ import annotations

from pathlib import Path

import typer

from kidneyscan.cli._app import app


@app.command()
def phantom(
    out: Path = typer.Option(
        ..., "--out", help="Output folder (CT-KIDNEY layout is written here)."
    ),
    n: int = typer.Option(2000, "--n", min=1, help="Number of images, split evenly over classes."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same bytes."),
    sites: int = typer.Option(
        1, "--sites", min=1, help="Number of synthetic hospitals (non-IID scanners and class mix)."
    ),
    image_size: int = typer.Option(
        512, "--image-size", min=32, help="Image side in pixels (anatomy is drawn in mm)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Generate a synthetic kidney-CT dataset (Cyst, Normal, Stone, Tumor) with masks."""
    from kidneyscan.data.phantom import generate_dataset

    try:
        path = generate_dataset(
            out, n, seed=seed, sites=sites, image_size=image_size, progress=progress
        )
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"wrote {n} images ({sites} site(s), {image_size} px) to {path}")


@app.command()
def eda(
    data: Path = typer.Argument(
        ..., help="Dataset folder in the CT-KIDNEY layout (real or phantom)."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder for PNG plots and the summary."),
    max_per_class: int | None = typer.Option(
        None, "--max-per-class", min=1, help="Read at most this many images per class for stats."
    ),
    montage: int = typer.Option(16, "--montage", min=1, help="Images per class montage."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sub-sample and montage choice."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Exploratory data analysis: class counts, sizes, grey levels, montages (PNG + Markdown).

    DATA is a dataset folder in the CT-KIDNEY layout (real or phantom).
    """
    from kidneyscan.data.datasets import DataError
    from kidneyscan.data.eda import run_eda

    try:
        result = run_eda(
            data,
            out,
            max_per_class=max_per_class,
            montage_size=montage,
            seed=seed,
            progress=progress,
        )
    except (DataError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    counts = ", ".join(f"{k} {v}" for k, v in result.summary["class_counts"].items())
    typer.echo(f"{result.summary['n_images']} images ({counts}); wrote {len(result.files)} files")
    typer.echo(f"summary: {result.out_dir / 'eda_summary.md'}")
