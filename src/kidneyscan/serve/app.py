"""Flask application factory: configuration, model loading, guards and JSON errors.

``create_app()`` with no arguments reads its settings from ``KIDNEYSCAN_*`` environment
variables, which makes it the gunicorn entry point::

    KIDNEYSCAN_CHECKPOINT=runs/demo/checkpoint \\
        gunicorn -w 2 -b 127.0.0.1:8000 "kidneyscan.serve:create_app()"
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

import torch
from flask import Flask, Request, Response, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from kidneyscan.serve.api import api_bp, compat_bp, health_bp
from kidneyscan.serve.config import ServeConfig
from kidneyscan.serve.inputs import InputError
from kidneyscan.serve.predictor import Predictor
from kidneyscan.serve.security import RateLimiter
from kidneyscan.serve.state import (  # re-exported: callers and tests import them from here
    DISCLAIMER,
    EXTENSION_KEY,
    ServiceState,
    error_response,
    get_state,
    guard_request,
)
from kidneyscan.serve.web import web_bp

log = logging.getLogger("kidneyscan.serve")


class InMemoryRequest(Request):
    """A request whose uploaded files stay in memory.

    Werkzeug spools uploads over 500 KiB to a temporary file; here they are kept in a
    ``BytesIO`` instead (bounded by ``MAX_CONTENT_LENGTH``), so nothing uploaded ever touches
    the disk.
    """

    def _get_file_stream(  # type: ignore[override]
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        return io.BytesIO()


def missing_checkpoint_message(path: Path) -> str:
    """What to tell a user who has no checkpoint yet."""
    return (
        f"no model checkpoint at {path} (a folder with model.safetensors and metadata.json). "
        "Make one with `make demo` (writes runs/demo/checkpoint/), or pass --checkpoint PATH / "
        "set KIDNEYSCAN_CHECKPOINT."
    )


def create_app(
    config: ServeConfig | None = None,
    *,
    predictor: Predictor | None = None,
    **overrides: Any,
) -> Flask:
    """Build the KidneyScan Flask app.

    Parameters
    ----------
    config
        Settings; ``ServeConfig.from_env(**overrides)`` when ``None``.
    predictor
        An already loaded predictor (tests, embedding); loaded from ``config.checkpoint``
        when ``None``.
    **overrides
        Fields of :class:`ServeConfig` overriding the environment (only without ``config``).

    Returns
    -------
    Flask
        The app; ready (model loaded and warmed up) on return unless ``background_load``.

    Raises
    ------
    FileNotFoundError
        No checkpoint folder where the settings point.
    """
    cfg = config if config is not None else ServeConfig.from_env(**overrides)
    here = Path(__file__).parent
    app = Flask(
        "kidneyscan.serve",
        template_folder=str(here / "templates"),
        static_folder=str(here / "static"),
    )
    app.request_class = InMemoryRequest
    app.config.update(
        MAX_CONTENT_LENGTH=cfg.max_content_length,
        # Form fields (base64 JSON aside) are small; files are limited by MAX_CONTENT_LENGTH.
        MAX_FORM_MEMORY_SIZE=cfg.max_content_length,
        DEBUG=False,
        TESTING=False,
        PROPAGATE_EXCEPTIONS=False,
        TRAP_HTTP_EXCEPTIONS=False,
    )
    app.debug = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if cfg.trusted_proxies:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=cfg.trusted_proxies, x_proto=cfg.trusted_proxies
        )
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)

    state = ServiceState(cfg, RateLimiter(cfg.rate_limit, cfg.rate_window_s), predictor)
    app.extensions[EXTENSION_KEY] = state
    if predictor is None:
        if not (cfg.checkpoint / "metadata.json").is_file():
            raise FileNotFoundError(missing_checkpoint_message(cfg.checkpoint))
        if cfg.background_load:
            threading.Thread(target=_load, args=(state,), daemon=True).start()
        else:
            _load(state)
            if state.predictor is None:
                raise RuntimeError(f"could not load {cfg.checkpoint}: {state.load_error}")

    for bp in (api_bp, compat_bp, health_bp, web_bp):
        app.register_blueprint(bp)
    _register_errors(app)
    _register_hooks(app)
    return app


def _load(state: ServiceState) -> None:
    cfg = state.config
    try:
        t0 = time.perf_counter()
        state.predictor = Predictor.from_checkpoint(
            cfg.checkpoint, backend=cfg.backend, refer_threshold=cfg.refer_threshold
        )
        log.info(
            "model %s loaded from %s and warmed up in %.1f s",
            state.predictor.model_info["name"],
            cfg.checkpoint,
            time.perf_counter() - t0,
        )
    except Exception as exc:  # noqa: BLE001 - reported by /health/ready and the caller
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("loading %s failed: %s", cfg.checkpoint, state.load_error)


def _register_errors(app: Flask) -> None:
    @app.errorhandler(InputError)
    def _input_error(exc: InputError) -> Response:
        g.error_code = exc.code
        resp = error_response(exc.status, exc.code, exc.message)
        if exc.status == 503:  # model still loading: tell clients when to come back
            resp.headers["Retry-After"] = "5"
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = (exc.name or "error").lower().replace(" ", "_")
        g.error_code = code
        message = exc.description or exc.name or "error"
        if status == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            message = f"request body larger than the limit of {limit / 1048576:g} MiB"
        resp = error_response(status, code, message)
        for header in ("Allow", "Retry-After", "WWW-Authenticate"):
            value = exc.get_response().headers.get(header)
            if value:
                resp.headers[header] = value
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # A bug, not bad input (decoding turns every failure into InputError). The message is
        # not echoed to the client, and only the error type is logged so that no uploaded
        # content can end up in the log.
        ref = uuid.uuid4().hex[:12]
        g.error_code = "internal_error"
        log.error("internal error %s: %s", ref, type(exc).__name__)
        return error_response(500, "internal_error", f"internal error (reference {ref})")


def _register_hooks(app: Flask) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _headers_and_log(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
            "script-src 'self'; object-src 'none'; frame-ancestors 'none'",
        )
        if request.path.startswith("/api") or request.path in ("/upload", "/model-info"):
            resp.headers["Cache-Control"] = "no-store"
        # Only method, route, status, duration and counts: never file names, tags or content.
        ms = (time.perf_counter() - g.get("t0", time.perf_counter())) * 1000.0
        extra = f" ({g.n_images} image(s))" if g.get("n_images") else ""
        err = f" [{g.error_code}]" if g.get("error_code") else ""
        log.info(
            "%s %s -> %d in %.0f ms%s%s",
            request.method,
            request.path,
            resp.status_code,
            ms,
            extra,
            err,
        )
        return resp


__all__ = [
    "DISCLAIMER",
    "EXTENSION_KEY",
    "InMemoryRequest",
    "ServiceState",
    "create_app",
    "error_response",
    "get_state",
    "guard_request",
    "missing_checkpoint_message",
]
