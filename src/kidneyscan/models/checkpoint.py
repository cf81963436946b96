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


def save_checkpoint(out_dir: str | Path, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write weights and metadata to ``out_dir``; returns the folder.

    ``metadata`` must contain ``model`` (``{"name": ..., "kwargs": {...}}``), ``classes`` and
    ``preprocessing``; ``code_version`` and ``weights_sha256`` are filled in here.
    """
    for key in ("model", "classes", "preprocessing"):
        if key not in metadata:
            raise CheckpointError(f"checkpoint metadata lacks {key!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    meta = dict(metadata)
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
    from kidneyscan.models.factory import create_classifier

    ckpt = Path(ckpt_dir)
    meta = read_metadata(ckpt)
    wfile = ckpt / WEIGHTS_FILE
    if not wfile.is_file():
        raise CheckpointError(f"{ckpt}: no {WEIGHTS_FILE}")
    if verify and meta.get("weights_sha256") and sha256_file(wfile) != meta["weights_sha256"]:
        raise CheckpointError(f"{wfile}: SHA-256 does not match metadata.json (file changed?)")
    spec = meta["model"]
    model = create_classifier(spec["name"], len(meta["classes"]), **spec.get("kwargs", {}))
    missing, unexpected = model.load_state_dict(load_file(str(wfile)), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{wfile}: weights do not fit model {spec['name']!r} "
            f"(missing {len(missing)}, unexpected {len(unexpected)})"
        )
    model.eval()
    return model, meta
