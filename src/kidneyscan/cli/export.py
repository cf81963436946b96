"""``kidneyscan export``: ONNX fp32 and int8 (static QDQ) export of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kidneyscan.cli._app import app


@app.command()
def export(
    checkpoint: Path = typer.Option(
        ...,
        "--checkpoint",
        "-c",
        help="Checkpoint folder (model.safetensors + metadata.json).",
    ),
    fmt: str = typer.Option("onnx", "--format", help="Export format (only 'onnx')."),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: <checkpoint>/onnx, where serving looks)."
    ),
    int8: bool = typer.Option(
        False, "--int8", help="Also write an int8 static (QDQ) graph, if it passes the guard."
    ),
    calibration: Path | None = typer.Option(
        None,
        "--calibration",
        help="Image folder (CT-KIDNEY class folders give labels) to calibrate int8 on; the "
        "images not used for calibration validate it unless --validation is given.",
    ),
    validation: Path | None = typer.Option(
        None, "--validation", help="Separate image folder for the int8 quality guard."
    ),
    calibration_size: int = typer.Option(
        300, min=1, help="Images used to calibrate the int8 activation ranges."
    ),
    validation_size: int = typer.Option(
        300, min=1, help="Images used by the quality guard (at most)."
    ),
    min_agreement: float = typer.Option(
        0.99,
        min=0.0,
        max=1.0,
        help="Refuse int8 when its top-1 agreement with fp32 PyTorch is below this.",
    ),
    max_f1_drop: float = typer.Option(
        0.02, min=0.0, help="Refuse int8 when macro-F1 falls by more than this (labelled data)."
    ),
    opset: int = typer.Option(17, min=13, help="ONNX opset version."),
    seed: int = typer.Option(0, help="Seed of the calibration / validation shuffle."),
) -> None:
    """Export a checkpoint to ONNX Runtime (fp32, optionally int8 behind a quality guard)."""
    import logging

    # ONNX Runtime's quantizer logs every bias copy at INFO on the root logger: keep the root
    # at WARNING and show our own progress.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kidneyscan").setLevel(logging.INFO)
    if fmt != "onnx":
        typer.echo(f"error: unknown --format {fmt!r}; only 'onnx' is supported", err=True)
        raise typer.Exit(2)
    if not (checkpoint / "metadata.json").is_file():
        typer.echo(f"error: {checkpoint} is not a checkpoint folder (no metadata.json)", err=True)
        raise typer.Exit(2)
    if int8 and calibration is None:
        typer.echo("error: --int8 needs --calibration DATA (a folder of images)", err=True)
        raise typer.Exit(2)
    if calibration is not None and not int8:
        typer.echo("error: --calibration is only used with --int8", err=True)
        raise typer.Exit(2)

    from kidneyscan.export.onnx import ExportError, default_out_dir, export_checkpoint
    from kidneyscan.export.quantize import QuantizationRefused, quantize_checkpoint
    from kidneyscan.models.checkpoint import CheckpointError

    target = out if out is not None else default_out_dir(checkpoint)
    try:
        path = export_checkpoint(checkpoint, target, opset=opset)
        typer.echo(f"fp32: {path}")
        if int8:
            assert calibration is not None
            report = quantize_checkpoint(
                checkpoint,
                target,
                calibration,
                calibration_size=calibration_size,
                validation=validation,
                validation_size=validation_size,
                min_agreement=min_agreement,
                max_f1_drop=max_f1_drop,
                seed=seed,
            )
            typer.echo(f"int8: {target / 'model.int8.onnx'}")
            typer.echo(json.dumps(report.to_dict(), indent=2))
    except QuantizationRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        typer.echo(json.dumps(exc.report.to_dict(), indent=2), err=True)
        raise typer.Exit(1) from None
    except (ExportError, CheckpointError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
