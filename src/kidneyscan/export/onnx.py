"""Export a KidneyScan checkpoint to ONNX (fp32).

Layout written next to (by default inside) the checkpoint::

    <checkpoint>/onnx/
        model.onnx        fp32 graph, input ``input`` (B, C, S, S) -> output ``logits`` (B, K)
        model.int8.onnx   int8 QDQ graph (only when ``--int8`` passed the quality guard)
        metadata.json     the checkpoint's metadata + an ``onnx`` section (files, SHA-256,
                          opset, source weights SHA-256, int8 quality report)

The class list, the preprocessing and the source weights' SHA-256 are also stored in each
ONNX file's ``metadata_props`` so a lone ``.onnx`` file still says how to feed it.

The exporter is PyTorch's TorchScript-based one (``dynamo=False``): on this code base it
exports the hybrid in ~1 s where the ``torch.export`` path takes ~20 s, and both give the same
graph outputs (max |diff| ~1e-7 measured on the hybrid at 64 px). ``exporter="dynamo"`` selects
the other one.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kidneyscan.models.checkpoint import sha256_file

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
SIDECAR_FILE = "metadata.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17

#: metadata_props keys written into every exported graph.
PROP_KEYS = ("kidneyscan.classes", "kidneyscan.preprocessing", "kidneyscan.weights_sha256")


class ExportError(RuntimeError):
    """The export failed or produced a graph that does not match the PyTorch model."""


def _dummy_input(metadata: dict[str, Any], batch: int = 2) -> torch.Tensor:
    pre = metadata.get("preprocessing") or {}
    size = int(pre.get("image_size", 224))
    width = int(pre.get("image_width") or size)
    chans = int(pre.get("in_chans", 3))
    return torch.randn(batch, chans, size, width, generator=torch.Generator().manual_seed(0))


def export_bytes(
    model: nn.Module,
    metadata: dict[str, Any],
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
) -> bytes:
    """Serialise ``model`` to an ONNX graph with a dynamic batch axis.

    Parameters
    ----------
    model
        The classifier (put in eval mode here).
    metadata
        Checkpoint metadata: ``preprocessing`` fixes the input shape, ``classes`` the outputs.
    opset
        ONNX opset version.
    exporter
        ``"torchscript"`` (fast, default) or ``"dynamo"`` (``torch.export`` based).

    Returns
    -------
    bytes
        The serialised ``onnx.ModelProto`` including :data:`PROP_KEYS` in ``metadata_props``.
    """
    import onnx

    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    model = model.eval()
    x = _dummy_input(metadata)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and tracer warnings about shape-derived
        # Python ints (the hybrid's token grid) are expected: the batch axis stays dynamic and
        # the export is verified numerically afterwards.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                model,
                (x,),
                buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
            )
            proto = onnx.load_from_string(buf.getvalue())
        else:
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                verbose=False,
            )
            if program is None:  # pragma: no cover - dynamo=True always returns a program
                raise ExportError("torch.onnx.export returned no program")
            proto = program.model_proto
    set_properties(proto, metadata)
    out: bytes = proto.SerializeToString()
    return out


def set_properties(proto: Any, metadata: dict[str, Any]) -> None:
    """Write the class list, preprocessing and source weights hash into ``metadata_props``."""
    values = {
        "kidneyscan.classes": json.dumps(list(metadata["classes"])),
        "kidneyscan.preprocessing": json.dumps(metadata["preprocessing"]),
        "kidneyscan.weights_sha256": str(metadata.get("weights_sha256") or ""),
    }
    keep = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_properties(path: str | Path) -> dict[str, Any]:
    """Decode :data:`PROP_KEYS` of an exported graph (``classes`` and ``preprocessing`` parsed)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    missing = [k for k in PROP_KEYS if k not in props]
    if missing:
        raise ExportError(f"{path}: not a KidneyScan ONNX export (metadata lacks {missing})")
    return {
        "classes": json.loads(props["kidneyscan.classes"]),
        "preprocessing": json.loads(props["kidneyscan.preprocessing"]),
        "weights_sha256": props["kidneyscan.weights_sha256"] or None,
    }


def make_session(model: str | Path | bytes, *, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on CPU with full graph optimisation.

    Parameters
    ----------
    model
        Path of an ``.onnx`` file or its serialised bytes.
    threads
        Intra-op threads (``None``: ONNX Runtime's default, one per physical core).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: the QDQ graphs make ORT chatty at warning level
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def verify_against_torch(
    session: Any, model: nn.Module, metadata: dict[str, Any], *, atol: float = 1e-3
) -> float:
    """Compare ONNX Runtime and PyTorch logits on random inputs; return the max |difference|.

    Raises
    ------
    ExportError
        When shapes differ or the difference exceeds ``atol`` (fp32 graphs agree to ~1e-6).
    """
    x = _dummy_input(metadata, batch=3)
    with torch.inference_mode():
        ref = model.eval()(x).float().numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != ref.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}")
    diff = float(np.abs(got - ref).max())
    if not np.isfinite(diff) or diff > atol:
        raise ExportError(f"ONNX logits differ from PyTorch by {diff:.3g} (> {atol})")
    return diff


def default_out_dir(ckpt_dir: str | Path) -> Path:
    """Where exports of a checkpoint go by default: ``<checkpoint>/onnx``."""
    return Path(ckpt_dir) / ONNX_DIR


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
) -> Path:
    """Export a checkpoint folder to ``<out_dir>/model.onnx`` + sidecar ``metadata.json``.

    The graph is checked against the PyTorch model (same shape, logits within 1e-3) before it
    is written. An older ``model.int8.onnx`` in ``out_dir`` is removed, since it no longer
    matches the fresh fp32 export's record.

    Returns
    -------
    Path
        The written ``model.onnx``.
    """
    from kidneyscan.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(ckpt_dir)
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = export_bytes(model, meta, opset=opset, exporter=exporter)
    diff = verify_against_torch(make_session(blob), model, meta)
    path = out / FP32_FILE
    path.write_bytes(blob)
    stale = out / INT8_FILE
    if stale.exists():
        stale.unlink()
    sidecar = dict(meta)
    sidecar["onnx"] = {
        "fp32": {"file": FP32_FILE, "sha256": sha256_file(path), "max_abs_diff_vs_torch": diff},
        "opset": opset,
        "exporter": exporter,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "source_checkpoint": str(Path(ckpt_dir).resolve()),
        "source_weights_sha256": meta.get("weights_sha256"),
        "torch_version": torch.__version__,
    }
    write_sidecar(out, sidecar)
    log.info("exported %s (max |logit diff| vs torch %.2g)", path, diff)
    return path


def write_sidecar(out_dir: Path, sidecar: dict[str, Any]) -> Path:
    """Write the sidecar ``metadata.json`` of an export folder."""
    path = out_dir / SIDECAR_FILE
    path.write_text(json.dumps(sidecar, indent=2, default=str))
    return path


def read_sidecar(out_dir: str | Path) -> dict[str, Any]:
    """Read the sidecar ``metadata.json`` of an export folder."""
    path = Path(out_dir) / SIDECAR_FILE
    if not path.is_file():
        raise ExportError(f"{out_dir}: no {SIDECAR_FILE}; run `kidneyscan export` first")
    meta: dict[str, Any] = json.loads(path.read_text())
    if "onnx" not in meta:
        raise ExportError(f"{path}: has no 'onnx' section (not an export folder)")
    return meta
