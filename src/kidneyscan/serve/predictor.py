"""The served model: checkpoint + the training preprocessing + temperature calibration.

A :class:`Predictor` is built once per process from a checkpoint folder. It rebuilds the exact
:class:`~kidneyscan.preprocess.pipeline.Preprocessor` stored in the checkpoint, so a served image
becomes the same tensor as in evaluation; divides logits by the calibration temperature; and
runs a warm-up inference before it reports ready. Inference goes through a *backend* (anything
with ``logits(batch) -> np.ndarray``): :class:`TorchBackend` here, an ONNX Runtime backend from
``kidneyscan.export`` when asked for ``"onnx"``. Grad-CAM always uses the torch model.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from kidneyscan.explain.gradcam import find_target_layers, gradcam_heatmap
from kidneyscan.models.checkpoint import load_checkpoint
from kidneyscan.models.factory import gradcam_reshape_transform
from kidneyscan.preprocess.pipeline import Preprocessor

#: Confidence bands: (lower bound, name, words shown to the user), highest first.
BANDS: tuple[tuple[float, str, str], ...] = (
    (0.90, "high", "High confidence (90 % or more)"),
    (0.70, "good", "Good confidence (70-89 %)"),
    (0.50, "moderate", "Moderate confidence (50-69 %)"),
    (0.0, "low", "Low confidence (below 50 %)"),
)
DEFAULT_REFER_THRESHOLD = 0.70


def confidence_band(confidence: float) -> tuple[str, str]:
    """Return ``(band, words)`` for a calibrated confidence in [0, 1].

    high >= 0.90, good 0.70-0.89, moderate 0.50-0.69, low < 0.50.
    """
    for lower, name, words in BANDS:
        if confidence >= lower:
            return name, words
    return BANDS[-1][1], BANDS[-1][2]


class Backend(Protocol):
    """What the predictor needs from an inference engine."""

    name: str

    def logits(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, C, S, S) normalised inputs -> (B, num_classes) float logits."""
        ...


class TorchBackend:
    """Run the torch model on CPU under ``torch.inference_mode()``.

    Parameters
    ----------
    model
        Classifier in eval mode.
    """

    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def logits(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, C, S, S) -> (B, num_classes) float32 logits."""
        x = torch.as_tensor(batch, dtype=torch.float32)
        with torch.inference_mode():
            out = self.model(x)
        return out.float().cpu().numpy()


#: Backend names -> "module:callable" building a backend from (model, metadata, checkpoint dir).
#: The ONNX backend lives in the perf area's ``kidneyscan.export`` package.
BACKEND_FACTORIES: dict[str, str] = {
    "onnx": "kidneyscan.export.backend:make_onnx_backend",
}


def make_backend(name: str, model: nn.Module, metadata: dict[str, Any], ckpt_dir: Path) -> Backend:
    """Build a backend by name (``torch`` or a key of :data:`BACKEND_FACTORIES`).

    Raises
    ------
    ValueError
        For an unknown name, or a backend whose package is not installed.
    """
    if name == "torch":
        return TorchBackend(model)
    if name not in BACKEND_FACTORIES:
        raise ValueError(
            f"unknown backend {name!r}; choose torch or {', '.join(BACKEND_FACTORIES)}"
        )
    module_name, _, attr = BACKEND_FACTORIES[name].partition(":")
    try:
        factory: Callable[..., Backend] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"backend {name!r} is not available ({exc})") from exc
    return factory(model, metadata, ckpt_dir)


@dataclass
class Prediction:
    """One calibrated prediction."""

    probabilities: dict[str, float]
    predicted_class: str
    predicted_index: int
    confidence: float
    band: str
    band_text: str
    refer_to_radiologist: bool
    timing_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used by the API."""
        return {
            "predicted_class": self.predicted_class,
            "predicted_index": self.predicted_index,
            "confidence": round(self.confidence, 6),
            "confidence_band": self.band,
            "confidence_band_text": self.band_text,
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "refer_to_radiologist": self.refer_to_radiologist,
            "timing_ms": {k: round(v, 2) for k, v in self.timing_ms.items()},
        }


@dataclass
class Explanation:
    """Grad-CAM result: the model-input image, the heatmap and the class it explains."""

    image: np.ndarray
    heatmap: np.ndarray
    target_class: str
    target_index: int
    layer: str
    time_ms: float


class Predictor:
    """A checkpoint ready to serve.

    Parameters
    ----------
    model
        Torch classifier in eval mode (also used for Grad-CAM).
    metadata
        The checkpoint's ``metadata.json`` content.
    backend
        Inference backend; a :class:`TorchBackend` of ``model`` when ``None``.
    refer_threshold
        Calibrated confidence below which ``refer_to_radiologist`` is set.
    warmup
        Run one inference now, so the first request is not slow and ``ready`` is meaningful.
    """

    def __init__(
        self,
        model: nn.Module,
        metadata: dict[str, Any],
        *,
        backend: Backend | None = None,
        refer_threshold: float = DEFAULT_REFER_THRESHOLD,
        warmup: bool = True,
    ) -> None:
        if not 0.0 <= refer_threshold <= 1.0:
            raise ValueError(f"refer_threshold must be in [0, 1], got {refer_threshold}")
        self.model = model.eval()
        self.metadata = metadata
        self.classes: tuple[str, ...] = tuple(metadata["classes"])
        self.preprocessor = Preprocessor.from_dict(metadata["preprocessing"])
        temperature = float(metadata.get("temperature", 1.0) or 1.0)
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"checkpoint temperature must be a positive number, got {temperature}")
        self.temperature = temperature
        self.backend: Backend = backend if backend is not None else TorchBackend(model)
        self.refer_threshold = refer_threshold
        self._target_layers: list[nn.Module] | None = None
        self._layer_name = ""
        # One model, many request threads: Grad-CAM hooks would capture the activations of a
        # concurrent forward pass, so every use of the model is serialised.
        self._lock = threading.Lock()
        self.ready = False
        if warmup:
            self.warm_up()

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | Path,
        *,
        backend: str = "torch",
        refer_threshold: float = DEFAULT_REFER_THRESHOLD,
        warmup: bool = True,
    ) -> Predictor:
        """Load a checkpoint folder (weights verified against their SHA-256) and warm up."""
        path = Path(ckpt_dir)
        model, meta = load_checkpoint(path)
        engine = make_backend(backend, model, meta, path)
        return cls(model, meta, backend=engine, refer_threshold=refer_threshold, warmup=warmup)

    # -- facts -----------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Height of the model input."""
        return self.preprocessor.image_size

    @property
    def input_size(self) -> tuple[int, int]:
        """Model input ``(height, width)``."""
        return self.preprocessor.input_size

    @property
    def model_info(self) -> dict[str, Any]:
        """Model name, version, weights SHA-256, backend and temperature (for every response)."""
        spec = self.metadata.get("model", {})
        return {
            "name": spec.get("name", "unknown"),
            "version": str(self.metadata.get("code_version", "unknown")),
            "weights_sha256": self.metadata.get("weights_sha256"),
            "backend": self.backend.name,
            "temperature": self.temperature,
        }

    # -- inference ---------------------------------------------------------------------------
    def warm_up(self, *, explain: bool = True) -> None:
        """Run one inference (and one Grad-CAM) on a blank image; then sets :attr:`ready`."""
        blank = np.zeros(self.input_size, dtype=np.float32)
        # A blank image has no body: the ROI steps' "whole image used" / "no kidney found"
        # warnings mean nothing here.
        roi_log = logging.getLogger("kidneyscan.preprocess")
        level = roi_log.level
        roi_log.setLevel(logging.ERROR)
        try:
            tensor = self.prepare(blank)[1]
        finally:
            roi_log.setLevel(level)
        logits = self.backend.logits(tensor[None])
        if logits.shape != (1, len(self.classes)) or not np.isfinite(logits).all():
            raise RuntimeError(
                f"warm-up produced logits of shape {logits.shape}; "
                f"expected (1, {len(self.classes)})"
            )
        if explain:
            # Grad-CAM's first use imports pytorch-grad-cam and probes the model for its
            # target layer: done here so that the first /explain request is not the slow one.
            self.explain(self.preprocessor.resize(blank), tensor, 0)
        self.ready = True

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, torch.Tensor, dict[str, Any] | None]:
        """Training-time preprocessing of one float32 (H, W) image in [0, 1].

        Returns
        -------
        resized : np.ndarray
            float32 (h, w) image after the pipeline steps and resize (what the model sees,
            before normalisation; shown on the web page).
        tensor : torch.Tensor
            The normalised (C, h, w) model input, identical to ``Preprocessor(image)``.
        roi : dict or None
            The crop box in pixels of ``image`` (``top, left, bottom, right, source``;
            ``source`` is ``"spine"`` for the kidney band, ``"body"`` / ``"full"`` when no
            vertebra was found), or ``None`` when the pipeline crops nothing.
        """
        steps, roi = self.preprocessor.apply_steps_with_roi(image)
        resized = self.preprocessor.resize(steps)
        return resized, self.preprocessor.to_tensor(resized), roi

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled softmax of (B, K) logits, in float64."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict_tensors(self, batch: Sequence[torch.Tensor]) -> list[Prediction]:
        """Predict a list of preprocessed (C, S, S) tensors in one batch."""
        t0 = time.perf_counter()
        with self._lock:
            logits = self.backend.logits(torch.stack(list(batch)))
        infer_ms = (time.perf_counter() - t0) * 1000.0
        probs = self.calibrated(logits)
        out = []
        for row in probs:
            idx = int(np.argmax(row))
            conf = float(row[idx])
            band, words = confidence_band(conf)
            out.append(
                Prediction(
                    probabilities={c: float(p) for c, p in zip(self.classes, row, strict=True)},
                    predicted_class=self.classes[idx],
                    predicted_index=idx,
                    confidence=conf,
                    band=band,
                    band_text=words,
                    refer_to_radiologist=conf < self.refer_threshold,
                    timing_ms={"inference": infer_ms / len(probs)},
                )
            )
        return out

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Preprocess and predict float32 (H, W) images in [0, 1]."""
        return self.predict_tensors([self.prepare(im)[1] for im in images])

    def class_index(self, target: object) -> int:
        """Resolve a class name (case-insensitive) or index; ``ValueError`` names the choices."""
        if isinstance(target, int) and not isinstance(target, bool):
            if 0 <= target < len(self.classes):
                return target
        elif isinstance(target, str):
            key = target.strip().lower()
            if key.isdigit() and int(key) < len(self.classes):
                return int(key)
            lowered = [c.lower() for c in self.classes]
            if key in lowered:
                return lowered.index(key)
        raise ValueError(
            f"unknown target class {target!r}; choose one of {', '.join(self.classes)} "
            f"or an index 0-{len(self.classes) - 1}"
        )

    def explain(self, resized: np.ndarray, tensor: torch.Tensor, target_index: int) -> Explanation:
        """Grad-CAM heatmap of a prepared image for class ``target_index`` (torch model)."""
        t0 = time.perf_counter()
        with self._lock:
            if self._target_layers is None:
                self._target_layers = find_target_layers(
                    self.model, self.input_size, self.preprocessor.in_chans
                )
                names = {id(m): n for n, m in self.model.named_modules()}
                self._layer_name = ",".join(names.get(id(m), "?") for m in self._target_layers)
            # Grad-CAM explains one forward pass: the mirrored pass of test-time averaging
            # would mix a second set of activations into the map.
            tta = getattr(self.model, "flip_tta", False)
            if tta:
                self.model.flip_tta = False  # type: ignore[assignment]
            try:
                heat = gradcam_heatmap(
                    self.model,
                    tensor,
                    target_index,
                    self._target_layers,
                    reshape_transform=gradcam_reshape_transform(self.model),
                )
            finally:
                if tta:
                    self.model.flip_tta = True  # type: ignore[assignment]
        return Explanation(
            image=resized,
            heatmap=heat,
            target_class=self.classes[target_index],
            target_index=target_index,
            layer=self._layer_name,
            time_ms=(time.perf_counter() - t0) * 1000.0,
        )
