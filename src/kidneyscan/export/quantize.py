"""int8 static (QDQ) quantization with ONNX Runtime, calibrated through the checkpoint's own
preprocessing, and a quality guard that refuses a bad int8 model.

Recipe: ``quant_pre_process`` (shape inference + graph optimisation, ONNX Runtime's advice
before quantizing) -> ``quantize_static`` in QDQ format, per-channel symmetric int8 weights,
uint8 activations, MinMax ranges averaged over single calibration images (a few hundred,
through :class:`~kidneyscan.preprocess.pipeline.Preprocessor` exactly as in training and
serving) rather than the extremes over all of them, and the high-resolution convolutions
(output stride <= 4: a ResNet's stem and first stage) left in float. Measured on the default
CT ResNet-152 hybrid in ``benchmarks/results/int8_recipes.md``.

Quality guard (documented thresholds): on a validation set disjoint from the calibration
images, the int8 graph's top-1 must agree with the fp32 **PyTorch** model on at least
:data:`DEFAULT_MIN_AGREEMENT` (99 %) of the images, and its macro-F1 (when labels are known)
must not fall more than :data:`DEFAULT_MAX_F1_DROP` (0.02) below the fp32 model's. Otherwise
:class:`QuantizationRefused` is raised and no int8 file is left behind.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
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
    make_session,
    read_sidecar,
    set_properties,
    write_sidecar,
)
from kidneyscan.models.checkpoint import sha256_file

log = logging.getLogger(__name__)

DEFAULT_MIN_AGREEMENT = 0.99
DEFAULT_MAX_F1_DROP = 0.02
DEFAULT_CALIBRATION_SIZE = 300
DEFAULT_VALIDATION_SIZE = 300
# Only the compute-heavy ops: int8 LayerNorm/Softmax/GELU cost accuracy and gain nothing on
# CPU (ORT runs them in float between DequantizeLinear nodes anyway).
DEFAULT_OP_TYPES: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
#: Conv nodes with output stride <= this stay float (see :func:`high_resolution_convs`).
DEFAULT_FLOAT_STRIDE = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".bmp", ".tif", ".tiff")


class QuantizationRefused(RuntimeError):
    """The int8 graph failed the quality guard; ``report`` says by how much."""

    def __init__(self, message: str, report: QualityReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class QualityReport:
    """Agreement of the int8 graph with fp32 PyTorch on a validation set."""

    n_images: int
    agreement: float
    macro_f1_fp32: float | None
    macro_f1_int8: float | None
    macro_f1_change: float | None
    max_abs_logit_diff: float
    min_agreement: float
    max_f1_drop: float
    passed: bool
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def quality_report(
    ref_logits: np.ndarray,
    q_logits: np.ndarray,
    labels: Sequence[int] | None,
    *,
    num_classes: int,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
) -> QualityReport:
    """Judge quantized logits against the fp32 reference.

    Parameters
    ----------
    ref_logits, q_logits
        (N, K) logits of fp32 PyTorch and of the int8 graph on the same images.
    labels
        True labels (for the macro-F1 change) or ``None`` when unknown.
    num_classes
        K, so absent classes still count in the macro average.
    min_agreement
        Lowest accepted top-1 agreement in [0, 1].
    max_f1_drop
        Largest accepted macro-F1 decrease (>= 0).
    """
    from sklearn.metrics import f1_score

    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    if max_f1_drop < 0:
        raise ValueError(f"max_f1_drop must be >= 0, got {max_f1_drop}")
    ref = np.asarray(ref_logits)
    q = np.asarray(q_logits)
    if ref.shape != q.shape or ref.ndim != 2 or len(ref) == 0:
        raise ValueError(f"logit shapes differ or are empty: {ref.shape} vs {q.shape}")
    ref_top, q_top = ref.argmax(1), q.argmax(1)
    agreement = float((ref_top == q_top).mean())
    reasons = []
    if agreement < min_agreement:
        reasons.append(f"top-1 agreement {agreement:.2%} < {min_agreement:.2%}")
    f1_ref = f1_q = change = None
    if labels is not None:
        y = np.asarray(labels)
        if y.shape != (len(ref),):
            raise ValueError(f"labels have shape {y.shape}; expected ({len(ref)},)")
        kw: dict[str, Any] = {
            "labels": list(range(num_classes)),
            "average": "macro",
            "zero_division": 0,
        }
        f1_ref = float(f1_score(y, ref_top, **kw))
        f1_q = float(f1_score(y, q_top, **kw))
        change = f1_q - f1_ref
        if -change > max_f1_drop:
            reasons.append(f"macro-F1 fell by {-change:.4f} > {max_f1_drop}")
    return QualityReport(
        n_images=len(ref),
        agreement=agreement,
        macro_f1_fp32=f1_ref,
        macro_f1_int8=f1_q,
        macro_f1_change=change,
        max_abs_logit_diff=float(np.abs(ref - q).max()),
        min_agreement=min_agreement,
        max_f1_drop=max_f1_drop,
        passed=not reasons,
        reasons=reasons,
    )


# ----------------------------------------------------------------------------- images
@dataclass
class ImageSet:
    """Preprocessed images ``(N, C, S, S)`` float32 and their labels (``None`` when unknown)."""

    inputs: np.ndarray
    labels: np.ndarray | None
    paths: list[str]


def list_images(data: str | Path) -> tuple[list[Path], list[int] | None]:
    """Image files of ``data`` and their labels.

    A CT-KIDNEY / class-folder tree gives labels (via
    :func:`kidneyscan.data.datasets.scan_dataset`); any other folder is walked for image files
    and gives no labels (then the guard checks agreement only).
    """
    from kidneyscan.data.datasets import DataError, scan_dataset

    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration data {root} is not a folder")
    try:
        samples = scan_dataset(root)
    except DataError:
        samples = []
    if samples:
        return [s.path for s in samples], [s.label for s in samples]
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files, None


def preprocess_images(paths: Sequence[Path], preprocessing: dict[str, Any]) -> np.ndarray:
    """Load and preprocess images exactly as training and serving do -> (N, C, S, S)."""
    from kidneyscan.data.datasets import load_image
    from kidneyscan.preprocess.pipeline import Preprocessor

    pre = Preprocessor.from_dict(preprocessing)
    return np.stack([pre(load_image(p)).numpy() for p in paths]).astype(np.float32)


def calibration_and_validation(
    data: str | Path,
    preprocessing: dict[str, Any],
    *,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    validation: str | Path | None = None,
    validation_size: int = DEFAULT_VALIDATION_SIZE,
    seed: int = 0,
) -> tuple[ImageSet, ImageSet]:
    """Pick disjoint calibration and validation images.

    Without a separate ``validation`` folder, the images of ``data`` are shuffled (``seed``)
    and split: the first ``calibration_size`` calibrate, up to ``validation_size`` of the rest
    validate. With too few images for both, it raises rather than validate on calibration
    images.
    """
    files, labels = list_images(data)
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    if validation is not None:
        cal_idx = order[:calibration_size]
        vfiles, vlabels = list_images(validation)
        vorder = list(range(len(vfiles)))
        random.Random(seed + 1).shuffle(vorder)
        val_files = [vfiles[i] for i in vorder[:validation_size]]
        val_labels = None if vlabels is None else [vlabels[i] for i in vorder[:validation_size]]
    else:
        if len(files) < 2:
            raise ValueError(f"{data}: need >= 2 images to calibrate and validate")
        # Keep at least a quarter of a small folder for validation.
        n_cal = min(calibration_size, len(files) - max(1, len(files) // 4))
        cal_idx = order[:n_cal]
        rest = order[n_cal : n_cal + validation_size]
        val_files = [files[i] for i in rest]
        val_labels = None if labels is None else [labels[i] for i in rest]
    cal_files = [files[i] for i in cal_idx]
    cal = ImageSet(preprocess_images(cal_files, preprocessing), None, [str(p) for p in cal_files])
    val = ImageSet(
        preprocess_images(val_files, preprocessing),
        None if val_labels is None else np.asarray(val_labels),
        [str(p) for p in val_files],
    )
    return cal, val


class _Reader:
    """ONNX Runtime ``CalibrationDataReader`` over preprocessed arrays, in small batches."""

    def __init__(self, inputs: np.ndarray, batch: int = 16) -> None:
        self._chunks = [inputs[i : i + batch] for i in range(0, len(inputs), batch)]
        self._batches: Iterator[np.ndarray] = iter(self._chunks)

    def get_next(self) -> dict[str, np.ndarray] | None:
        arr = next(self._batches, None)
        return None if arr is None else {INPUT_NAME: arr}

    def rewind(self) -> None:
        self._batches = iter(self._chunks)


def high_resolution_convs(model_path: str | Path, max_stride: int) -> list[str]:
    """Names of the Conv nodes whose output is at most ``max_stride`` times smaller than the
    input image (height), read from the shapes that shape inference put in the graph.

    These early convolutions hold a small share of the compute but quantize worst: their
    errors then travel through every later block.
    """
    import onnx

    proto = onnx.load(str(model_path))
    dims = {
        v.name: v.type.tensor_type.shape.dim
        for v in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]
    }
    image = dims[proto.graph.input[0].name]
    if len(image) != 4 or not image[2].HasField("dim_value"):
        raise ExportError("the graph input has no static height; cannot find early convolutions")
    height = image[2].dim_value
    names = []
    for node in proto.graph.node:
        out = dims.get(node.output[0]) if node.op_type == "Conv" else None
        if out is None or len(out) != 4 or not out[2].HasField("dim_value"):
            continue
        if out[2].dim_value * max_stride >= height:
            names.append(node.name)
    return names


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    *,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    moving_average: bool = True,
    float_stride: int = DEFAULT_FLOAT_STRIDE,
) -> Path:
    """Static QDQ int8 quantization of an fp32 graph, calibrated on preprocessed inputs.

    ``op_types`` are the ONNX op types given int8 kernels (the rest stays float);
    activation ranges are MinMax (ONNX Runtime's histogram calibrators keep every activation
    of every image in memory: 64 images at 224 x 336 ran out of 23 GiB); ``moving_average``
    calibrates them one image at a time and averages the per-image
    ranges (ONNX Runtime's ``CalibMovingAverage``), so a few extreme images do not stretch
    them; Conv nodes with output stride <= ``float_stride`` stay float (0: quantize all).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("no calibration images")
    if not op_types:
        raise ValueError("op_types is empty: nothing would be quantized")

    class Reader(_Reader, CalibrationDataReader):  # type: ignore[misc]
        pass

    with tempfile.TemporaryDirectory(prefix="ks-quant-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=False)
        keep_float = high_resolution_convs(prepped, float_stride) if float_stride > 0 else []
        extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
        if moving_average:
            extra |= {"CalibMovingAverage": True, "CalibMovingAverageConstant": 0.05}
        quantize_static(
            str(prepped),
            str(out_path),
            Reader(calibration, batch=1 if moving_average else 16),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=list(op_types),
            nodes_to_exclude=keep_float,
            # Symmetric weights let ORT use its fast s8s8/u8s8 kernels (VNNI on this CPU).
            extra_options=extra,
        )
    return Path(out_path)


def run_session(session: Any, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """Logits of an ONNX Runtime session over (N, C, S, S) inputs, in batches."""
    outs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: inputs[i : i + batch]})[0]
        for i in range(0, len(inputs), batch)
    ]
    return np.concatenate(outs).astype(np.float32)


def torch_logits(model: nn.Module, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """fp32 PyTorch logits (the reference the guard compares with)."""
    model = model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            outs.append(model(torch.from_numpy(inputs[i : i + batch])).float().numpy())
    return np.concatenate(outs)


def quantize_checkpoint(
    ckpt_dir: str | Path,
    export_dir: str | Path,
    calibration: str | Path,
    *,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    validation: str | Path | None = None,
    validation_size: int = DEFAULT_VALIDATION_SIZE,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    seed: int = 0,
) -> QualityReport:
    """Quantize ``<export_dir>/model.onnx`` to ``model.int8.onnx`` if it passes the guard.

    The report is stored in the sidecar ``metadata.json`` (``onnx.int8``) and as
    ``int8_quality.json`` whether or not it passed.

    Raises
    ------
    QuantizationRefused
        When agreement or the macro-F1 change miss their thresholds; no int8 file is kept.
    """
    from kidneyscan.models.checkpoint import load_checkpoint

    out = Path(export_dir)
    fp32 = out / FP32_FILE
    sidecar = read_sidecar(out)
    if not fp32.is_file():
        raise ExportError(f"{fp32} is missing; export fp32 first")
    model, meta = load_checkpoint(ckpt_dir)
    if sidecar["onnx"].get("source_weights_sha256") != meta.get("weights_sha256"):
        raise ExportError(f"{fp32} was exported from other weights than {ckpt_dir}; re-export")
    cal, val = calibration_and_validation(
        calibration,
        meta["preprocessing"],
        calibration_size=calibration_size,
        validation=validation,
        validation_size=validation_size,
        seed=seed,
    )
    log.info("calibrating int8 on %d images, validating on %d", len(cal.inputs), len(val.inputs))
    target = out / INT8_FILE
    with tempfile.TemporaryDirectory(prefix="ks-int8-") as tmp:
        candidate = quantize_onnx(fp32, Path(tmp) / INT8_FILE, cal.inputs)
        q_logits = run_session(make_session(candidate), val.inputs)
        report = quality_report(
            torch_logits(model, val.inputs),
            q_logits,
            None if val.labels is None else val.labels.tolist(),
            num_classes=len(meta["classes"]),
            min_agreement=min_agreement,
            max_f1_drop=max_f1_drop,
        )
        entry = {
            **report.to_dict(),
            "calibration_images": len(cal.inputs),
            "calibration_data": str(calibration),
            "validation_data": str(validation if validation is not None else calibration),
        }
        (out / "int8_quality.json").write_text(json.dumps(entry, indent=2))
        if not report.passed:
            if target.exists():
                target.unlink()
            sidecar["onnx"].pop("int8", None)
            sidecar["onnx"]["int8_refused"] = entry
            write_sidecar(out, sidecar)
            raise QuantizationRefused(
                "int8 refused: " + "; ".join(report.reasons) + f" (on {report.n_images} images)",
                report,
            )
        import onnx

        proto = onnx.load(str(candidate))
        set_properties(proto, meta)
        onnx.save(proto, str(candidate))
        shutil.move(str(candidate), target)
    sidecar["onnx"].pop("int8_refused", None)
    sidecar["onnx"]["int8"] = {"file": INT8_FILE, "sha256": sha256_file(target), **entry}
    write_sidecar(out, sidecar)
    log.info("int8 written to %s: agreement %.2f%%", target, 100 * report.agreement)
    return report
