"""Grad-CAM heatmaps on a spatial stage of a classifier, via ``pytorch-grad-cam``.

The heatmap is computed on the model's last spatial feature map (a ConvNeXt stage for the
hybrid and the timm backbones) and resized to the model's input size, so it lines up with the
preprocessed image the model actually saw.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

# pytorch-grad-cam registers hooks on the model: two explanations at once on one model would
# capture each other's activations, so every Grad-CAM call on any model is serialised.
_CAM_LOCK = threading.Lock()


def find_target_layers(
    model: nn.Module, image_size: int | tuple[int, int] = 64, in_chans: int = 3
) -> list[nn.Module]:
    """Pick the layer(s) Grad-CAM should explain.

    Uses ``kidneyscan.models.factory.gradcam_target_layers(model)`` (the last ConvNeXt stage of
    the hybrid, the last conv stage of the CNN baselines); for architectures it does not know,
    probes the model once and returns the last module whose output is a 4-D feature map with a
    spatial size above 1 x 1.

    Parameters
    ----------
    model
        A classifier mapping (B, C, S, S) to logits.
    image_size, in_chans
        Shape of the probe input (a side, or ``(height, width)``).

    Returns
    -------
    list of nn.Module
        The target layers (one element).

    Raises
    ------
    ValueError
        If the model has no module with a spatial 4-D output.
    """
    from kidneyscan.models.factory import gradcam_target_layers

    try:
        return list(gradcam_target_layers(model))
    except ValueError:
        pass  # an architecture the factory does not know: find the layer by probing

    fired: list[nn.Module] = []

    def hook(module: nn.Module, _inp: object, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.ndim == 4 and min(out.shape[-2:]) > 1:
            fired.append(module)

    # Only modules with weights of their own subtree count: an Identity (timm's ``norm_pre``)
    # passes the last stage's output through but is no meaningful layer to name.
    candidates = [
        m
        for m in model.modules()
        if m is not model and not isinstance(m, nn.Identity) and any(True for _ in m.parameters())
    ]
    handles = [m.register_forward_hook(hook) for m in candidates]
    try:
        with torch.no_grad():
            hw = (image_size, image_size) if isinstance(image_size, int) else image_size
            model(torch.zeros(1, in_chans, *hw))
    finally:
        for h in handles:
            h.remove()
    if not fired:
        raise ValueError(f"{type(model).__name__} has no layer with a spatial 4-D output")
    # A timm ConvNeXt stage (or any module called "...Stage") is the natural unit; otherwise
    # the last module that produced a spatial map.
    stages = [m for m in fired if type(m).__name__.lower().endswith("stage")]
    return [stages[-1] if stages else fired[-1]]


def gradcam_heatmap(
    model: nn.Module,
    input_tensor: torch.Tensor,
    target_class: int,
    target_layers: Sequence[nn.Module] | None = None,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Grad-CAM of one image for one class.

    Parameters
    ----------
    model
        Classifier in eval mode.
    input_tensor
        Normalised (C, S, S) or (1, C, S, S) tensor (not an inference-mode tensor).
    target_class
        Index of the class whose evidence is shown.
    target_layers
        Layers to explain; :func:`find_target_layers` when ``None``.
    reshape_transform
        Turns a token-grid output into (B, C, h, w) for transformer layers
        (``kidneyscan.models.factory.gradcam_reshape_transform``); ``None`` for CNN stages.

    Returns
    -------
    np.ndarray
        float32 (S, S) heatmap in [0, 1], aligned with the input.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = input_tensor if input_tensor.ndim == 4 else input_tensor[None]
    if x.shape[0] != 1:
        raise ValueError(f"expected one image, got a batch of {x.shape[0]}")
    if target_layers is None:
        target_layers = find_target_layers(model, x.shape[-1], x.shape[1])
    # A clone turns a possible inference-mode tensor into a normal one that autograd accepts;
    # requiring its gradient keeps activations differentiable when the backbone is frozen
    # (the hybrid freezes most of its ConvNeXt by default).
    x = x.detach().clone().requires_grad_(True)
    with (
        _CAM_LOCK,
        torch.inference_mode(False),
        torch.enable_grad(),
        GradCAM(
            model=model, target_layers=list(target_layers), reshape_transform=reshape_transform
        ) as cam,
    ):
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(target_class))])
    out = np.nan_to_num(np.asarray(heat[0], dtype=np.float32))
    return np.clip(out, 0.0, 1.0)


def colorize_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """Map a [0, 1] heatmap to RGBA uint8 (JET colours; alpha grows with the heat).

    Transparent where there is no evidence, so the heatmap can be layered over the image.
    """
    h8 = (np.clip(heatmap, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(h8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = (np.clip(heatmap * 1.5, 0.15, 1.0) * 255).astype(np.uint8)
    return np.dstack([rgb, alpha])


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """Blend a heatmap over a grayscale image.

    Parameters
    ----------
    image
        float32 (S, S) image in [0, 1].
    heatmap
        float32 (S, S) heatmap in [0, 1], same shape.
    alpha
        Weight of the heatmap in [0, 1].

    Returns
    -------
    np.ndarray
        uint8 (S, S, 3) RGB overlay.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if image.shape != heatmap.shape:
        raise ValueError(f"image {image.shape} and heatmap {heatmap.shape} differ in shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=2).astype(np.float32)
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=1.0 - alpha)


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 (H, W), (H, W, 3) or (H, W, 4) array, or float [0, 1] (H, W), as PNG.

    The PNG carries pixels only: no text chunks or other metadata.
    """
    arr = array
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
