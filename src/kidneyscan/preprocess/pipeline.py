"""The one preprocessing pipeline shared by training, evaluation and serving.

A :class:`Preprocessor` is plain data (serialisable to JSON and stored in every checkpoint's
``metadata.json``): a chain of named image-processing steps, then resize, channel expansion and
normalisation. Training, ``kidneyscan evaluate`` and the service rebuild it with
:meth:`Preprocessor.from_dict`, so the model never sees different inputs at serving time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

#: name -> function(image float32 (H, W) in [0, 1], **params) -> same. Extended by STEP().
STEPS: dict[str, Callable[..., np.ndarray]] = {}
#: ROI steps: name -> function(image, **params) -> box with ``top, left, bottom, right,
#: source`` (see :class:`kidneyscan.preprocess.roi.RoiBox`). The pipeline crops to that box
#: itself, so the box it reports is exactly the crop the model saw.
STEP_BOXES: dict[str, Callable[..., Any]] = {}
#: ROI steps that also change pixels: name -> function(image, **params) -> the full-size image
#: the box is cut from (the box itself is found on the step's input).
STEP_PIXELS: dict[str, Callable[..., np.ndarray]] = {}
#: Steps that existed once, and what replaces them (a clear error for old configs).
RETIRED_STEPS: dict[str, str] = {
    "crop_kidneys": "crop_kidney_band (found both kidneys on 8 of 40 real slices; retired)",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_step(
    name: str,
    *,
    box: Callable[..., Any] | None = None,
    pixels: Callable[..., np.ndarray] | None = None,
) -> Callable[[Callable[..., np.ndarray]], Callable[..., np.ndarray]]:
    """Decorator: make an image function usable as a pipeline step under ``name``.

    ``box``: for a crop step, the function returning its crop box (same parameters); the
    pipeline then reports that box (:meth:`Preprocessor.apply_steps_with_roi`). ``pixels``:
    for a crop step that also changes pixels, the function returning the full-size image the
    box is cut from (same parameters; the box is found on the unchanged input).
    """
    if pixels is not None and box is None:
        raise ValueError(f"step {name!r}: pixels= needs box= (it belongs to a crop step)")

    def deco(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        STEPS[name] = fn
        if box is not None:
            STEP_BOXES[name] = box
        if pixels is not None:
            STEP_PIXELS[name] = pixels
        return fn

    return deco


def _ensure_steps_registered() -> None:
    # The DIP modules register their steps on import; importing here keeps users from having to.
    import importlib

    for mod in ("enhance", "restore", "segment", "morphology", "roi", "anatomy"):
        try:
            importlib.import_module(f"kidneyscan.preprocess.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kidneyscan.preprocess.{mod}":
                raise


@dataclass
class Preprocessor:
    """Image-processing steps, then resize to ``image_size``, channel expansion and normalisation.

    Parameters
    ----------
    steps
        List of ``{"name": step_name, **params}`` applied in order to the float image.
    image_size
        Output height in pixels (and width, unless ``image_width`` is given).
    image_width
        Output width in pixels; ``None`` for a square ``image_size`` output.
    in_chans
        1 keeps one channel; 3 repeats the grayscale channel for ImageNet-style backbones.
    mean, std
        Per-channel normalisation (length ``in_chans``, or 3 and then reduced for 1 channel).
    """

    steps: list[dict[str, Any]] = field(default_factory=list)
    image_size: int = 224
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    image_width: int | None = None

    def __post_init__(self) -> None:
        _ensure_steps_registered()
        for step in self.steps:
            if "name" not in step:
                raise ValueError(f"pipeline step {step!r} has no 'name'")
            if step["name"] in RETIRED_STEPS:
                raise ValueError(
                    f"pipeline step {step['name']!r} is retired; use {RETIRED_STEPS[step['name']]}"
                )
            if step["name"] not in STEPS:
                raise ValueError(
                    f"unknown pipeline step {step['name']!r}; known: {', '.join(sorted(STEPS))}"
                )
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.image_width is not None and self.image_width < 8:
            raise ValueError(f"image_width must be >= 8 or None, got {self.image_width}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")

    @property
    def input_size(self) -> tuple[int, int]:
        """Output ``(height, width)`` in pixels."""
        return self.image_size, self.image_width or self.image_size

    def apply_steps(self, image: np.ndarray) -> np.ndarray:
        """Run the named steps on a float32 (H, W) image in [0, 1]."""
        return self.apply_steps_with_roi(image)[0]

    def apply_steps_with_roi(self, image: np.ndarray) -> tuple[np.ndarray, dict[str, Any] | None]:
        """Run the steps; also return the crop box of the ROI step(s), if any.

        Returns
        -------
        image, roi
            The processed float32 image and ``{"top", "left", "bottom", "right", "source"}``
            in pixels of the *input* image (offsets of nested crops added up), or ``None``
            when no step crops to a box.
        """
        out = np.asarray(image, dtype=np.float32)
        if out.ndim != 2:
            raise ValueError(f"expected a 2-D grayscale image, got shape {out.shape}")
        roi: dict[str, Any] | None = None
        for step in self.steps:
            params = {k: v for k, v in step.items() if k != "name"}
            box_fn = STEP_BOXES.get(step["name"])
            if box_fn is None:
                out = STEPS[step["name"]](out, **params)
            else:
                b = box_fn(out, **params)
                edit = STEP_PIXELS.get(step["name"])
                if edit is not None:
                    out = edit(out, **params)
                out = out[b.top : b.bottom, b.left : b.right]
                dy, dx = (roi["top"], roi["left"]) if roi else (0, 0)
                roi = {
                    "top": b.top + dy,
                    "left": b.left + dx,
                    "bottom": b.bottom + dy,
                    "right": b.right + dx,
                    "source": b.source,
                }
            out = np.clip(out, 0.0, 1.0).astype(np.float32)
        return out, roi

    def resize(self, image: np.ndarray) -> np.ndarray:
        """Resize a processed image to :attr:`input_size` (area when shrinking)."""
        h, w = self.input_size
        out: np.ndarray = np.asarray(image, dtype=np.float32)
        if out.shape != (h, w):
            interp = cv2.INTER_AREA if out.shape[0] > h else cv2.INTER_LINEAR
            out = cv2.resize(out, (w, h), interpolation=interp)
        return out.astype(np.float32)

    def image(self, image: np.ndarray) -> np.ndarray:
        """Steps, then resize to :attr:`input_size`: float32 (H, W) in [0, 1]."""
        return self.resize(self.apply_steps(image))

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """Normalise an already resized image to a (C, h, w) float32 tensor."""
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        mean = torch.tensor(self._per_channel(self.mean)).view(-1, 1, 1)
        std = torch.tensor(self._per_channel(self.std)).view(-1, 1, 1)
        t = t.expand(self.in_chans, -1, -1)
        return ((t - mean) / std).contiguous()

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Full chain: float32 (H, W) image in [0, 1] -> normalised (C, h, w) tensor."""
        return self.to_tensor(self.image(image))

    def _per_channel(self, values: tuple[float, ...]) -> tuple[float, ...]:
        vals = tuple(float(v) for v in values)
        if self.in_chans == 1:
            return (sum(vals) / len(vals),)
        return vals if len(vals) == 3 else vals * 3

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (stored in checkpoint metadata)."""
        return {
            "steps": [dict(s) for s in self.steps],
            "image_size": self.image_size,
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
            "image_width": self.image_width,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        allowed = {"steps", "image_size", "in_chans", "mean", "std", "image_width"}
        extra = set(d) - allowed
        if extra:
            raise ValueError(f"unknown preprocessing keys: {sorted(extra)}")
        return cls(
            steps=[dict(s) for s in d.get("steps", [])],
            image_size=int(d.get("image_size", 224)),
            in_chans=int(d.get("in_chans", 3)),
            mean=tuple(d.get("mean", IMAGENET_MEAN)),
            std=tuple(d.get("std", IMAGENET_STD)),
            image_width=int(d["image_width"]) if d.get("image_width") else None,
        )
