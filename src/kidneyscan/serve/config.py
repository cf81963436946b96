"""Service settings: defaults, overridable by ``KIDNEYSCAN_*`` environment variables.

The environment is how gunicorn deployments configure the app
(``gunicorn "kidneyscan.serve:create_app()"``); ``kidneyscan serve`` sets the same variables
from its options.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

#: Checkpoint the README's main command (``make demo``) writes; served when none is given.
DEFAULT_CHECKPOINT = Path("runs/demo/checkpoint")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one service process.

    Attributes
    ----------
    checkpoint
        Checkpoint folder (``KIDNEYSCAN_CHECKPOINT``; default ``runs/demo/checkpoint``).
    backend
        ``torch`` or ``onnx`` (``KIDNEYSCAN_BACKEND``).
    max_upload_mb
        Request size limit in MiB -> 413 (``KIDNEYSCAN_MAX_UPLOAD_MB``, default 32).
    max_pixels
        Largest width x height of one image, checked before decoding
        (``KIDNEYSCAN_MAX_PIXELS``, default 4096 x 4096).
    max_files
        Most images in one request (``KIDNEYSCAN_MAX_FILES``, default 16).
    refer_threshold
        Calibrated confidence below which ``refer_to_radiologist`` is true
        (``KIDNEYSCAN_REFER_THRESHOLD``, default 0.70).
    api_token
        When set, API calls need ``Authorization: Bearer <token>`` (``KIDNEYSCAN_API_TOKEN``).
    rate_limit, rate_window_s
        At most ``rate_limit`` API requests per client per ``rate_window_s`` seconds, else 429
        (``KIDNEYSCAN_RATE_LIMIT``, default 60; 0 turns it off; ``KIDNEYSCAN_RATE_WINDOW_S``).
    trusted_proxies
        Number of reverse proxies in front whose ``X-Forwarded-For`` is trusted to identify
        clients (``KIDNEYSCAN_TRUSTED_PROXIES``, default 0).
    torch_threads
        CPU threads for torch in this process (``KIDNEYSCAN_TORCH_THREADS``; unset: torch's).
    background_load
        Load the model in a thread so ``/health/live`` answers at once and ``/health/ready``
        says 503 until the warm-up passed (``KIDNEYSCAN_BACKGROUND_LOAD``).
    """

    checkpoint: Path = DEFAULT_CHECKPOINT
    backend: str = "torch"
    max_upload_mb: float = 32.0
    max_pixels: int = 4096 * 4096
    max_files: int = 16
    refer_threshold: float = 0.70
    api_token: str | None = None
    rate_limit: int = 60
    rate_window_s: float = 60.0
    trusted_proxies: int = 0
    torch_threads: int | None = None
    background_load: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))  # accept str paths too
        if self.backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', got {self.backend!r}")
        if not (self.max_upload_mb > 0 and math.isfinite(self.max_upload_mb)):
            raise ValueError(f"max_upload_mb must be positive, got {self.max_upload_mb}")
        for name in ("max_pixels", "max_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.refer_threshold <= 1.0:
            raise ValueError(f"refer_threshold must be in [0, 1], got {self.refer_threshold}")
        if self.rate_limit < 0 or self.rate_window_s <= 0:
            raise ValueError("rate_limit must be >= 0 and rate_window_s > 0")
        if self.trusted_proxies < 0:
            raise ValueError(f"trusted_proxies must be >= 0, got {self.trusted_proxies}")
        if self.api_token is not None and len(self.api_token) < 16:
            raise ValueError("KIDNEYSCAN_API_TOKEN must be at least 16 characters long")

    @property
    def max_content_length(self) -> int:
        """Request size limit in bytes (Flask ``MAX_CONTENT_LENGTH``)."""
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServeConfig:
        """Defaults, then ``KIDNEYSCAN_*`` variables, then ``overrides`` (``None`` ignored).

        Raises
        ------
        ValueError
            Naming the variable whose value cannot be parsed.
        """
        env = os.environ if env is None else env
        parsers: dict[str, Callable[[str], Any]] = {
            "checkpoint": Path,
            "backend": str,
            "max_upload_mb": float,
            "max_pixels": int,
            "max_files": int,
            "refer_threshold": float,
            "api_token": str,
            "rate_limit": int,
            "rate_window_s": float,
            "trusted_proxies": int,
            "torch_threads": int,
            "background_load": _parse_bool,
        }
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = f"KIDNEYSCAN_{f.name.upper()}"
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[f.name] = parsers[f.name](raw.strip())
            except ValueError as exc:
                raise ValueError(f"{var}={raw!r} is not valid: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown serve settings: {sorted(unknown)}")
        return replace(cls(), **values)


def _parse_bool(raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")
