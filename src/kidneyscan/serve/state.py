"""What the app factory and the blueprints share: per-app state, the JSON error body, the guard.

It sits below ``app.py``, ``api.py`` and ``web.py`` so that the factory can import the
blueprints at module top and the blueprints never import the factory (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, Response, current_app, jsonify, request

from kidneyscan.serve.config import ServeConfig
from kidneyscan.serve.predictor import Predictor
from kidneyscan.serve.security import RateLimiter, token_ok

DISCLAIMER = (
    "Research use only. KidneyScan is not a medical device and does not give a diagnosis; "
    "every result must be reviewed by a qualified radiologist."
)
EXTENSION_KEY = "kidneyscan"


@dataclass
class ServiceState:
    """What the views need: settings, the predictor once loaded, the rate limiter."""

    config: ServeConfig
    limiter: RateLimiter
    predictor: Predictor | None = None
    load_error: str | None = None


def get_state(app: Flask) -> ServiceState:
    """The :class:`ServiceState` of an app made by :func:`kidneyscan.serve.create_app`."""
    state: ServiceState = app.extensions[EXTENSION_KEY]
    return state


def error_response(status: int, code: str, message: str) -> Response:
    """The JSON error body every 4xx/5xx of the service uses."""
    resp = jsonify({"error": {"status": status, "code": code, "message": message}})
    resp.status_code = status
    return resp


def guard_request() -> Response | None:
    """Rate limit then bearer token, for API routes (``before_request`` of their blueprints)."""
    state = get_state(current_app)
    client = request.remote_addr or "unknown"
    retry = state.limiter.hit(client)
    if retry is not None:
        resp = error_response(
            429,
            "too_many_requests",
            f"rate limit of {state.config.rate_limit} requests per "
            f"{state.config.rate_window_s:g} s exceeded; retry in {retry} s",
        )
        resp.headers["Retry-After"] = str(retry)
        return resp
    token = state.config.api_token
    if token and not token_ok(request.headers.get("Authorization"), token):
        resp = error_response(
            401, "unauthorized", "missing or wrong token: send 'Authorization: Bearer <token>'"
        )
        resp.headers["WWW-Authenticate"] = 'Bearer realm="kidneyscan"'
        return resp
    return None
