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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_step(name: str) -> Callable[[Callable[..., np.ndarray]], Callable[..., np.ndarray]]:
    """Decorator: make an image function usable as a pipeline step under ``name``."""

    def deco(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        STEPS[name] = fn
        return fn

    return deco


def _ensure_steps_registered() -> None:
    # The DIP modules register their steps on import; importing here keeps users from having to.
    import importlib

    for mod in ("enhance", "restore", "segment", "morphology", "roi"):
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
        Output side length in pixels (square).
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

    def __post_init__(self) -> None:
        _ensure_steps_registered()
        for step in self.steps:
            if "name" not in step:
                raise ValueError(f"pipeline step {step!r} has no 'name'")
            if step["name"] not in STEPS:
                raise ValueError(
                    f"unknown pipeline step {step['name']!r}; known: {', '.join(sorted(STEPS))}"
                )
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")

    def apply_steps(self, image: np.ndarray) -> np.ndarray:
        """Run the named steps on a float32 (H, W) image in [0, 1]."""
        out = np.asarray(image, dtype=np.float32)
        if out.ndim != 2:
            raise ValueError(f"expected a 2-D grayscale image, got shape {out.shape}")
        for step in self.steps:
            params = {k: v for k, v in step.items() if k != "name"}
            out = np.clip(STEPS[step["name"]](out, **params), 0.0, 1.0).astype(np.float32)
        return out

    def image(self, image: np.ndarray) -> np.ndarray:
        """Steps, then resize to ``image_size`` (area interpolation): float32 (S, S) in [0, 1]."""
        out = self.apply_steps(image)
        if out.shape != (self.image_size, self.image_size):
            interp = cv2.INTER_AREA if out.shape[0] > self.image_size else cv2.INTER_LINEAR
            out = cv2.resize(out, (self.image_size, self.image_size), interpolation=interp)
        return out.astype(np.float32)

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """Normalise an already resized image to a (C, S, S) float32 tensor."""
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        mean = torch.tensor(self._per_channel(self.mean)).view(-1, 1, 1)
        std = torch.tensor(self._per_channel(self.std)).view(-1, 1, 1)
        t = t.expand(self.in_chans, -1, -1)
        return ((t - mean) / std).contiguous()

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Full chain: float32 (H, W) image in [0, 1] -> normalised (C, S, S) tensor."""
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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        allowed = {"steps", "image_size", "in_chans", "mean", "std"}
        extra = set(d) - allowed
        if extra:
            raise ValueError(f"unknown preprocessing keys: {sorted(extra)}")
        return cls(
            steps=[dict(s) for s in d.get("steps", [])],
            image_size=int(d.get("image_size", 224)),
            in_chans=int(d.get("in_chans", 3)),
            mean=tuple(d.get("mean", IMAGENET_MEAN)),
            std=tuple(d.get("std", IMAGENET_STD)),
        )
