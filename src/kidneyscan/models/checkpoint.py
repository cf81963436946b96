"""Checkpoints: ``model.safetensors`` + ``metadata.json`` in one folder.

``metadata.json`` holds everything needed to rebuild the model and its inputs exactly:
``model`` (``name`` + factory ``kwargs``), ``classes``, ``preprocessing``
(:meth:`Preprocessor.to_dict`), ``temperature`` (calibration), ``metrics``, ``split_file``,
``code_version``, ``weights_sha256`` and free-form ``extra``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import load_file, save_file

from kidneyscan import __version__
from kidneyscan.models.factory import create_classifier
from kidneyscan.models.registry import unwrap_model

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or inconsistent."""


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Factory options that fetch weights: the checkpoint already holds every weight, so they are
#: dropped when rebuilding (no hub access, no dependence on a local file still existing).
_WEIGHT_SOURCE_KWARGS = ("pretrained", "weights")


def load_time_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Factory kwargs of a checkpoint without weight sources (``pretrained``, ``weights``)."""
    return {k: v for k, v in kwargs.items() if k not in _WEIGHT_SOURCE_KWARGS}


def save_checkpoint(out_dir: str | Path, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write weights and metadata to ``out_dir``; returns the folder.

    Parameters
    ----------
    out_dir
        Folder to create or overwrite (``model.safetensors`` + ``metadata.json``).
    model
        The trained model; an Opacus ``GradSampleModule`` / DDP wrapper is unwrapped.
    metadata
        Must contain ``classes`` and ``preprocessing``; ``model`` (``{"name", "kwargs"}``) is
        taken from the model's ``kidneyscan_spec`` when absent. ``temperature`` defaults to 1.0;
        ``code_version`` and ``weights_sha256`` are filled in here.
    """
    model = unwrap_model(model)
    meta = dict(metadata)
    spec: Any = getattr(model, "kidneyscan_spec", None)
    if "model" not in meta and isinstance(spec, dict):
        meta["model"] = {"name": spec["name"], "kwargs": dict(spec["kwargs"])}
    for key in ("model", "classes", "preprocessing"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata lacks {key!r}")
    meta["model"] = {
        "name": meta["model"]["name"],
        "kwargs": load_time_kwargs(dict(meta["model"].get("kwargs", {}))),
    }
    meta.setdefault("temperature", 1.0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    meta["code_version"] = __version__
    meta["weights_sha256"] = sha256_file(out / WEIGHTS_FILE)
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return out


def read_metadata(ckpt_dir: str | Path) -> dict[str, Any]:
    """Read ``metadata.json`` of a checkpoint folder."""
    p = Path(ckpt_dir) / METADATA_FILE
    if not p.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {METADATA_FILE} (not a KidneyScan checkpoint)")
    meta: dict[str, Any] = json.loads(p.read_text())
    return meta


def load_checkpoint(ckpt_dir: str | Path, *, verify: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint folder (eval mode) and return it with its metadata."""
    ckpt = Path(ckpt_dir)
    meta = read_metadata(ckpt)
    wfile = ckpt / WEIGHTS_FILE
    if not wfile.is_file():
        raise CheckpointError(f"{ckpt}: no {WEIGHTS_FILE}")
    if verify and meta.get("weights_sha256") and sha256_file(wfile) != meta["weights_sha256"]:
        raise CheckpointError(f"{wfile}: SHA-256 does not match metadata.json (file changed?)")
    spec = meta.get("model")
    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(f"{ckpt}: metadata.json has no model name ('model': {{'name': ...}})")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes:
        raise CheckpointError(f"{ckpt}: metadata.json has no class list ('classes')")
    kwargs = load_time_kwargs(spec.get("kwargs", {}))
    try:
        model = create_classifier(spec["name"], len(classes), **kwargs)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt}: cannot rebuild model {spec['name']!r}: {exc}") from exc
    try:
        missing, unexpected = model.load_state_dict(load_file(str(wfile)), strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise CheckpointError(
            f"{wfile}: weights do not fit model {spec['name']!r}: {str(exc)[:300]}"
        ) from exc
    if missing or unexpected:
        raise CheckpointError(
            f"{wfile}: weights do not fit model {spec['name']!r} "
            f"(missing {len(missing)}, unexpected {len(unexpected)})"
        )
    model.eval()
    return model, meta
