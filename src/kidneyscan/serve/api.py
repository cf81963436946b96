"""JSON API (``/api/v1``), health checks and the reference project's alias routes.

Views only unpack the request, call the predictor and pack the answer.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from typing import Any

import cv2
import numpy as np
from flask import Blueprint, Response, current_app, g, jsonify, request

from kidneyscan.explain.gradcam import colorize_heatmap, overlay_heatmap, png_bytes
from kidneyscan.serve.inputs import DecodedImage, InputError, decode_upload
from kidneyscan.serve.openapi import build_openapi
from kidneyscan.serve.predictor import BANDS, Predictor
from kidneyscan.serve.state import DISCLAIMER, error_response, get_state, guard_request

api_bp = Blueprint("api", __name__, url_prefix="/api/v1")
compat_bp = Blueprint("compat", __name__)
health_bp = Blueprint("health", __name__)

compat_bp.before_request(guard_request)

INTENDED_USE = (
    "Research and education: a second look at single axial kidney CT slices (Normal, Cyst, "
    "Tumor, Stone) by ML engineers and radiology researchers. Not for diagnosis, triage or "
    "any clinical decision."
)
LIMITATIONS = (
    "Trained on the data summarised under 'training'; performance elsewhere (other scanners, "
    "protocols, contrast phases, children) is unknown.",
    "One 2-D slice at a time: no volume context, no prior studies, no clinical information.",
    "Only four classes: anything else (e.g. other tumours, hydronephrosis) is forced into one "
    "of them.",
    "Confidence is temperature-calibrated on validation data, which does not make it a "
    "probability of disease for a given patient.",
    "Grad-CAM shows where the evidence for a class lies at a coarse feature-map resolution; it "
    "is not a segmentation.",
)


# -- request parsing --------------------------------------------------------------------------
def _predictor() -> Predictor:
    state = get_state(current_app)
    if state.predictor is None:
        reason = "failed to load" if state.load_error else "still loading"
        raise InputError(503, f"model {reason}; retry shortly", "model_not_ready")
    return state.predictor


def _b64(value: Any, label: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("data")
    if not isinstance(value, str) or not value:
        raise InputError(
            400, f"{label}: expected a base64 string (or {{'data': base64}})", "bad_base64"
        )
    if value.startswith("data:"):  # data URL from a browser: keep what follows the comma
        value = value.partition(",")[2]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(400, f"{label}: not valid base64 ({exc})", "bad_base64") from exc


def read_uploads() -> tuple[list[bytes], dict[str, Any]]:
    """The uploaded files (in order) and the options of a predict/explain request.

    Multipart: every file field, in order (``file``, ``files``, ``image``... all accepted), and
    the form fields ``target_class`` and ``alpha``. JSON: ``{"image": b64}`` or
    ``{"images": [b64 | {"data": b64}, ...]}`` plus the same options.

    Raises
    ------
    InputError
        415 for another content type, 400 for no images or bad base64/JSON, 413 for too many.
    """
    max_files = get_state(current_app).config.max_files
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        blobs = [f.read() for _, f in request.files.items(multi=True)]
        options: dict[str, Any] = {k: request.form.get(k) for k in ("target_class", "alpha")}
    elif mimetype == "application/json":
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise InputError(400, "body is not a JSON object", "bad_json")
        items: list[Any] = []
        if "image" in body:
            items.append(body["image"])
        if "images" in body:
            if not isinstance(body["images"], list):
                raise InputError(400, "'images' must be a list of base64 strings", "bad_json")
            items.extend(body["images"])
        if len(items) > max_files:
            raise InputError(
                413, f"{len(items)} images sent; at most {max_files} per request", "too_many_files"
            )
        blobs = [_b64(v, f"image {i + 1}") for i, v in enumerate(items)]
        options = {k: body.get(k) for k in ("target_class", "alpha")}
    else:
        raise InputError(
            415,
            f"content type {mimetype or 'missing'!r} not accepted; send multipart/form-data "
            "files or an application/json body with base64 images",
            "unsupported_media_type",
        )
    if not blobs:
        raise InputError(
            400,
            "no image: send files as multipart/form-data (field 'file') or JSON "
            '{"image": "<base64>"}',
            "no_image",
        )
    if len(blobs) > max_files:
        raise InputError(
            413, f"{len(blobs)} images sent; at most {max_files} per request", "too_many_files"
        )
    return blobs, options


def _decode_all(blobs: list[bytes]) -> list[tuple[DecodedImage | InputError, float]]:
    """Decode every upload; a file that fails keeps its :class:`InputError` in its place."""
    cfg = get_state(current_app).config
    out: list[tuple[DecodedImage | InputError, float]] = []
    for i, blob in enumerate(blobs):
        t0 = time.perf_counter()
        label = f"file {i + 1}" if len(blobs) > 1 else "the file"
        try:
            decoded: DecodedImage | InputError = decode_upload(
                blob, label=label, max_pixels=cfg.max_pixels
            )
        except InputError as exc:
            decoded = exc
        out.append((decoded, (time.perf_counter() - t0) * 1000.0))
    return out


def _alpha(raw: Any) -> float:
    if raw is None or raw == "":
        return 0.5
    try:
        alpha = float(raw)
    except (TypeError, ValueError):
        alpha = math.nan
    if not 0.0 <= alpha <= 1.0:
        raise InputError(400, f"alpha must be a number in [0, 1], got {raw!r}", "bad_option")
    return alpha


#: Longest side of the uploaded slice sent back by ``explain`` for the page to draw the box on.
SLICE_PREVIEW_SIDE = 512

#: What the user is told when the kidney band could not be anchored on the spine.
ROI_WARNINGS = {
    "body": "spine not found: the model saw the whole body instead of the kidney band",
    "full": "spine not found and no body outline either: the model saw the whole image",
}


def _failure(index: int, exc: InputError) -> dict[str, Any]:
    return {
        "index": index,
        "ok": False,
        "error": {"status": exc.status, "code": exc.code, "message": exc.message},
    }


def _analyse(explain: bool) -> Response:
    t_start = time.perf_counter()
    predictor = _predictor()
    blobs, options = read_uploads()
    g.n_images = len(blobs)
    target: int | None = None
    if explain and options.get("target_class") not in (None, ""):
        try:
            target = predictor.class_index(options["target_class"])
        except ValueError as exc:
            raise InputError(400, str(exc), "bad_option") from exc
    alpha = _alpha(options.get("alpha")) if explain else 0.5
    decoded = _decode_all(blobs)
    failures = [(i, d) for i, (d, _) in enumerate(decoded) if isinstance(d, InputError)]
    if len(blobs) == 1 and failures:
        raise failures[0][1]  # one file: its own 4xx, as before batches existed

    good = [(i, d, ms) for i, (d, ms) in enumerate(decoded) if isinstance(d, DecodedImage)]
    prepared = []
    for _, dec, _ in good:
        t0 = time.perf_counter()
        prepared.append((*predictor.prepare(dec.image), (time.perf_counter() - t0) * 1000.0))
    # The files that decoded go through the model as one batch; the others keep their place
    # in the answer with their own error, so one bad file never fails the rest.
    predictions = predictor.predict_tensors([p[1] for p in prepared]) if prepared else []

    results: list[dict[str, Any]] = [_failure(i, exc) for i, exc in failures]
    for (i, dec, decode_ms), (resized, tensor, roi, prep_ms), pred in zip(
        good, prepared, predictions, strict=True
    ):
        item: dict[str, Any] = {"index": i, "ok": True, "input": dec.summary()}
        item.update(pred.to_dict())
        item["timing_ms"] = {
            "decode": round(decode_ms, 2),
            "preprocess": round(prep_ms, 2),
            **item["timing_ms"],
        }
        item["roi"] = roi
        item["warnings"] = list(dec.warnings)
        if roi is not None and roi.get("source") in ROI_WARNINGS:
            item["warnings"].append(ROI_WARNINGS[roi["source"]])
        if explain:
            item["explanation"] = _explanation(
                predictor,
                dec.image,
                resized,
                tensor,
                pred.predicted_index if target is None else target,
                alpha,
            )
            item["timing_ms"]["gradcam"] = item["explanation"].pop("time_ms")
        results.append(item)
    results.sort(key=lambda r: int(r["index"]))
    body: dict[str, Any] = {
        "model": predictor.model_info,
        "refer_threshold": predictor.refer_threshold,
        "count": len(results),
        "succeeded": len(good),
        "failed": len(failures),
        "results": results,
        "timing_ms": {"total": round((time.perf_counter() - t_start) * 1000.0, 2)},
        "disclaimer": DISCLAIMER,
    }
    if failures:
        # Only fixed error codes reach the log line, never messages (they name no patient data,
        # but the log promise is "codes and counts only").
        g.error_code = ",".join(sorted({exc.code for _, exc in failures}))
    if not good:
        # Nothing could be analysed: a 4xx like a single bad file, with every file's reason.
        first = failures[0][1]
        reasons = "; ".join(exc.message for _, exc in failures)
        message = f"none of the {len(blobs)} files could be analysed: {reasons}"
        resp = jsonify(
            {
                "error": {"status": first.status, "code": first.code, "message": message},
                **{k: body[k] for k in ("count", "succeeded", "failed", "results")},
            }
        )
        resp.status_code = first.status
        return resp
    return jsonify(body)


def _slice_preview(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The uploaded slice shrunk to at most :data:`SLICE_PREVIEW_SIDE` px, and the scale used."""
    h, w = image.shape
    scale = min(1.0, SLICE_PREVIEW_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image, scale


def _explanation(
    predictor: Predictor,
    original: np.ndarray,
    resized: Any,
    tensor: Any,
    target: int,
    alpha: float,
) -> dict[str, Any]:
    exp = predictor.explain(resized, tensor, target)
    preview, scale = _slice_preview(original)

    def b64png(arr: Any) -> str:
        return base64.b64encode(png_bytes(arr)).decode("ascii")

    return {
        "method": "Grad-CAM",
        "target_class": exp.target_class,
        "target_index": exp.target_index,
        "layer": exp.layer,
        "size": list(exp.heatmap.shape),
        "alpha": alpha,
        "image_png": b64png(exp.image),
        "heatmap_png": b64png(colorize_heatmap(exp.heatmap)),
        "overlay_png": b64png(overlay_heatmap(exp.image, exp.heatmap, alpha=alpha)),
        "slice_png": b64png(preview),
        "slice_size": list(preview.shape),
        "slice_scale": round(scale, 6),
        "time_ms": round(exp.time_ms, 2),
    }


# -- routes -----------------------------------------------------------------------------------
@api_bp.post("/predict")
def predict() -> Response:
    """Calibrated class probabilities for one or several images."""
    return _analyse(explain=False)


@api_bp.post("/explain")
def explain() -> Response:
    """Prediction plus a Grad-CAM heatmap for the predicted or requested class."""
    return _analyse(explain=True)


@api_bp.get("/model")
def model_card() -> Response:
    """Model card built from the checkpoint's metadata.json."""
    predictor = _predictor()
    meta = predictor.metadata
    spec = meta.get("model", {})
    cfg = get_state(current_app).config
    card = {
        "model": predictor.model_info,
        "architecture": {"name": spec.get("name"), "kwargs": spec.get("kwargs", {})},
        "task": meta.get("task"),
        "classes": list(predictor.classes),
        "input": {
            "image_size": predictor.image_size,
            "in_chans": predictor.preprocessor.in_chans,
            "accepted_types": ["image/png", "image/jpeg", "application/dicom"],
            "dicom_window": {"name": "abdomen", "width": 400, "level": 40},
            "max_pixels": cfg.max_pixels,
            "max_upload_bytes": cfg.max_content_length,
            "max_files": cfg.max_files,
        },
        "preprocessing": meta.get("preprocessing"),
        "calibration": {"method": "temperature scaling", "temperature": predictor.temperature},
        "confidence_bands": [
            {"band": name, "min_confidence": lower, "text": text} for lower, name, text in BANDS
        ],
        "refer_threshold": predictor.refer_threshold,
        "training": meta.get("training"),
        "metrics": meta.get("metrics"),
        "split_file": meta.get("split_file"),
        "intended_use": INTENDED_USE,
        "limitations": list(LIMITATIONS),
        "disclaimer": DISCLAIMER,
    }
    return jsonify(card)


@api_bp.get("/openapi.json")
def openapi() -> Response:
    """OpenAPI 3.1 description of this API."""
    state = get_state(current_app)
    classes = list(state.predictor.classes) if state.predictor else []
    return jsonify(build_openapi(classes, state.config))


@api_bp.before_request
def _guard_except_openapi() -> Response | None:
    # The OpenAPI document describes the API and holds no data: readable without a token,
    # like the health checks, so clients can discover how to authenticate.
    if request.endpoint == "api.openapi":
        return None
    return guard_request()


@health_bp.get("/health/live")
def live() -> Response:
    """Liveness: the process answers."""
    return jsonify({"status": "live"})


@health_bp.get("/health/ready")
def ready() -> Response:
    """Readiness: 200 only after the model loaded and a warm-up inference passed."""
    state = get_state(current_app)
    if state.predictor is not None and state.predictor.ready:
        return jsonify({"status": "ready", "model": state.predictor.model_info})
    status = "failed" if state.load_error else "loading"
    resp = jsonify({"status": status, "reason": state.load_error})
    resp.status_code = 503
    resp.headers["Retry-After"] = "5"
    return resp


# -- aliases of the reference project's routes ------------------------------------------------
@compat_bp.post("/upload")
def upload_alias() -> Response:
    """Alias of ``POST /api/v1/predict``."""
    return _analyse(explain=False)


@compat_bp.post("/api/analyze")
def analyze_alias() -> Response:
    """Alias of ``POST /api/v1/explain``."""
    return _analyse(explain=True)


@compat_bp.get("/model-info")
def model_info_alias() -> Response:
    """Alias of ``GET /api/v1/model``."""
    return model_card()


@health_bp.get("/health")
def health_alias() -> Response:
    """Alias of ``GET /health/ready``."""
    return ready()


__all__ = ["api_bp", "compat_bp", "health_bp", "error_response", "read_uploads"]
