"""ONNX Runtime inference backend for the service (``kidneyscan serve --backend onnx``).

Same interface as :class:`kidneyscan.serve.predictor.TorchBackend`: ``name`` and
``logits(batch) -> np.ndarray``. Grad-CAM keeps using the torch model (it needs gradients).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kidneyscan.export.onnx import (
    FP32_FILE,
    INPUT_NAME,
    INT8_FILE,
    OUTPUT_NAME,
    ExportError,
    default_out_dir,
    export_bytes,
    make_session,
    read_properties,
    verify_against_torch,
)

log = logging.getLogger(__name__)

#: Environment variable choosing the graph: ``auto`` (int8 when an accepted one exists), ``fp32``
#: or ``int8``.
PRECISION_ENV = "KIDNEYSCAN_ONNX_PRECISION"
THREADS_ENV = "KIDNEYSCAN_ONNX_THREADS"


class OnnxBackend:
    """Run an exported graph with ONNX Runtime on CPU.

    Parameters
    ----------
    model
        Path of an ``.onnx`` file or its serialised bytes.
    classes
        Expected class order; checked against the graph's output width (and its
        ``metadata_props`` when it has them).
    threads
        Intra-op threads (``None``: ONNX Runtime's default).
    precision
        ``"fp32"`` or ``"int8"``; shown in the service's model info as ``onnx-<precision>``.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        classes: list[str] | tuple[str, ...],
        *,
        threads: int | None = None,
        precision: str = "fp32",
    ) -> None:
        self.session = make_session(model, threads=threads)
        self.precision = precision
        self.name = f"onnx-{precision}"
        self.classes = tuple(classes)
        shape = self.session.get_outputs()[0].shape
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != len(self.classes)):
            raise ExportError(f"ONNX output shape {shape} does not fit {len(self.classes)} classes")
        if not isinstance(model, bytes):
            stored = read_properties(model)["classes"]
            if tuple(stored) != self.classes:
                raise ExportError(
                    f"{model}: class order {stored} differs from the checkpoint's "
                    f"{list(self.classes)}"
                )

    def logits(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, C, S, S) normalised inputs -> (B, num_classes) float32 logits."""
        if isinstance(batch, torch.Tensor):
            arr = batch.detach().float().cpu().numpy()
        else:
            arr = np.asarray(batch, dtype=np.float32)
        out: np.ndarray = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(arr)})[
            0
        ]
        return out.astype(np.float32, copy=False)


def _threads_from_env() -> int | None:
    raw = os.environ.get(THREADS_ENV) or os.environ.get("KIDNEYSCAN_TORCH_THREADS")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
    return value


def make_onnx_backend(
    model: nn.Module,
    metadata: dict[str, Any],
    ckpt_dir: str | Path,
    *,
    precision: str | None = None,
) -> OnnxBackend:
    """Backend factory used by the service (``BACKEND_FACTORIES["onnx"]``).

    Looks for ``<ckpt_dir>/onnx/`` (written by ``kidneyscan export``). ``precision`` (default:
    :data:`PRECISION_ENV`, else ``auto``) picks ``model.int8.onnx`` (``auto`` uses it when
    present: it is only written after passing the quality guard) or ``model.onnx``. Without an
    export folder the fp32 graph is exported in memory now (the checkpoint folder is not
    written to). A stale export (other weights than the checkpoint's) is an error.
    """
    choice = (precision or os.environ.get(PRECISION_ENV) or "auto").lower()
    if choice not in ("auto", "fp32", "int8"):
        raise ValueError(f"ONNX precision must be auto, fp32 or int8, got {choice!r}")
    threads = _threads_from_env()
    classes = list(metadata["classes"])
    folder = default_out_dir(ckpt_dir)
    fp32, int8 = folder / FP32_FILE, folder / INT8_FILE
    if choice == "int8" and not int8.is_file():
        raise ExportError(
            f"{int8} not found: run `kidneyscan export --checkpoint {ckpt_dir} --format onnx "
            "--int8 --calibration DATA` first"
        )
    path = int8 if choice == "int8" or (choice == "auto" and int8.is_file()) else fp32
    if path.is_file():
        stored = read_properties(path)["weights_sha256"]
        if stored and metadata.get("weights_sha256") and stored != metadata["weights_sha256"]:
            raise ExportError(
                f"{path} was exported from other weights than {ckpt_dir}; re-run kidneyscan export"
            )
        log.info("ONNX backend: %s", path)
        return OnnxBackend(
            path, classes, threads=threads, precision="int8" if path == int8 else "fp32"
        )
    log.info("ONNX backend: no export in %s, exporting fp32 in memory", folder)
    blob = export_bytes(model, metadata)
    backend = OnnxBackend(blob, classes, threads=threads, precision="fp32")
    verify_against_torch(backend.session, model, metadata)
    return backend
