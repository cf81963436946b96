"""TOML values for ``flwr`` and the run-config / node-config strings of its command line."""

from __future__ import annotations

import shlex
import tomllib
from collections.abc import Mapping
from typing import Any


def node_config(values: Mapping[str, Any]) -> str:
    """The ``--node-config`` string: ``{"partition-id": 0, "data-dir": "/x"}`` ->
    ``partition-id=0 data-dir="/x"``."""
    parts = []
    for key, value in values.items():
        parts.append(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}")
    return " ".join(parts)


def toml_value(value: Any) -> str:
    """One Python value written as a TOML literal (bool, number, or quoted string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_run_config(text: str) -> dict[str, Any]:
    """``"key=value key2='text'"`` -> dict, with TOML value syntax (as ``flwr run -c``)."""
    config: dict[str, Any] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"run-config entry {item!r} is not key=value")
        try:
            config[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            config[key] = value  # bare words are strings
    return config
