"""``kidneyscan serve``: the web service (Flask dev server, or gunicorn with ``--workers``)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from kidneyscan.cli._app import app


@app.command()
def serve(
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="Checkpoint folder (model.safetensors + metadata.json). "
        "Default: runs/demo/checkpoint, written by `make demo`.",
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on. Keep 127.0.0.1 unless a proxy fronts it."
    ),
    port: int = typer.Option(5000, min=1, max=65535, help="TCP port to listen on."),
    workers: int = typer.Option(
        1,
        min=1,
        help="Worker processes. 1: Flask's threaded server (development); more: gunicorn "
        "workers, each loading the model once.",
    ),
    backend: str = typer.Option("torch", help="Inference backend: torch or onnx."),
    threads: int | None = typer.Option(
        None, min=1, help="Torch CPU threads per worker (default: torch's choice)."
    ),
    refer_threshold: float | None = typer.Option(
        None,
        min=0.0,
        max=1.0,
        help="Calibrated confidence below which results are flagged 'refer to radiologist' "
        "(default 0.70).",
    ),
    max_upload_mb: float | None = typer.Option(
        None, min=0.001, help="Request size limit in MiB (default 32); larger requests get 413."
    ),
    rate_limit: int | None = typer.Option(
        None, min=0, help="API requests per client per minute (default 60; 0 = off)."
    ),
) -> None:
    """Serve the model: web page at / and JSON API at /api/v1 (research use only).

    Set KIDNEYSCAN_API_TOKEN to require 'Authorization: Bearer <token>' on API calls.
    """
    import logging

    from kidneyscan.serve.app import missing_checkpoint_message
    from kidneyscan.serve.config import DEFAULT_CHECKPOINT

    ckpt = checkpoint if checkpoint is not None else DEFAULT_CHECKPOINT
    if not (ckpt / "metadata.json").is_file():
        typer.echo(f"error: {missing_checkpoint_message(ckpt)}", err=True)
        raise typer.Exit(2)
    settings = {
        "KIDNEYSCAN_CHECKPOINT": str(ckpt.resolve()),
        "KIDNEYSCAN_BACKEND": backend,
        "KIDNEYSCAN_TORCH_THREADS": threads,
        "KIDNEYSCAN_REFER_THRESHOLD": refer_threshold,
        "KIDNEYSCAN_MAX_UPLOAD_MB": max_upload_mb,
        "KIDNEYSCAN_RATE_LIMIT": rate_limit,
    }
    # The environment is the one place settings live, so gunicorn workers see the same ones.
    for key, value in settings.items():
        if value is not None:
            os.environ[key] = str(value)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("KIDNEYSCAN_API_TOKEN"):
        typer.echo(
            f"warning: listening on {host} without KIDNEYSCAN_API_TOKEN: anyone who can reach "
            "this port can use the service",
            err=True,
        )

    from kidneyscan.serve.app import create_app

    try:
        if workers == 1:
            flask_app = create_app()
            typer.echo(f"KidneyScan serving {ckpt} at http://{host}:{port}/ (Ctrl+C to stop)")
            flask_app.run(host=host, port=port, debug=False, threaded=True, use_reloader=False)
        else:
            _run_gunicorn(host, port, workers)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _run_gunicorn(host: str, port: int, workers: int) -> None:
    from gunicorn.app.base import BaseApplication

    from kidneyscan.serve.app import create_app

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("timeout", 120)
            # No preload: each worker loads the model itself, after the fork (torch thread
            # pools do not survive a fork).
            self.cfg.set("preload_app", False)

        def load(self):  # type: ignore[no-untyped-def]
            return create_app()

    _Gunicorn().run()
