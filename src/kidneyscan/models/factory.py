"""One model factory for every architecture the project trains.

``create_classifier(name, num_classes, ...)`` returns an ``nn.Module`` mapping a normalised
``(B, in_chans, S, S)`` tensor to ``(B, num_classes)`` logits. Every model it returns also has

* ``forward_features(x)`` and ``forward_head(x, pre_logits=True)`` -> ``(B, D)`` penultimate
  embedding (SMOTE on embeddings, t-SNE...), timm's convention; torchvision models are wrapped;
* ``kidneyscan_spec``: ``{"name", "kwargs"}`` that rebuilds the same architecture with
  :func:`create_classifier` (what checkpoints store; never ``pretrained`` / ``weights``).

Grayscale CT is handled once, in the :class:`~kidneyscan.preprocess.pipeline.Preprocessor`:
with ``in_chans=3`` (the default) it repeats the gray channel, so ImageNet weights are used
unchanged. ``in_chans=1`` also works: timm adapts hub weights, :func:`load_weights` adapts local
ones (timm's ``adapt_input_conv``, sum of the RGB filters).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from kidneyscan.models.cnn import GoogLeNetClassifier, SmallCNN
from kidneyscan.models.hybrid import HybridCNNTransformer
from kidneyscan.models.registry import (  # re-exported: callers import them from the factory
    DEFAULT_WEIGHTS,
    HYBRID_BACKBONE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_NAMES,
    TIMM_ALIASES,
    entry_of,
    model_entry,
    unwrap_model,
)
from kidneyscan.models.weights import (
    PretrainedUnavailableWarning,
    create_timm_model,
    freeze_backbone,
    load_weights,
)
from kidneyscan.preprocess.pipeline import Preprocessor

log = logging.getLogger(__name__)


def resolve_name(name: str) -> str:
    """Project alias -> timm architecture name (``mobilenetv2`` -> ``mobilenetv2_100``)."""
    return TIMM_ALIASES.get(name, name)


def create_classifier(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    in_chans: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier by name.

    Parameters
    ----------
    name
        ``hybrid``, ``small_cnn``, ``resnet50``, ``vgg19``, ``mobilenetv2``, ``densenet169``,
        ``googlenet``, ``inception_v3``, ``vit_b16``, ``swin_t``, ``efficientnet_lite0``, or any
        timm model name.
    num_classes
        Size of the output layer.
    pretrained
        Hub weights through timm / torchvision (needs internet); offline it warns
        (:class:`PretrainedUnavailableWarning`) and initialises randomly.
    weights
        Local state dict / safetensors file (or ``"efficientnet-lite0"``) loaded into the
        backbone; the classifier layer is skipped when its shape differs.
    in_chans
        Input channels (3 = gray repeated by the Preprocessor; 1 = adapted first conv).
    **kwargs
        Architecture options: for ``hybrid`` those of
        :class:`~kidneyscan.models.hybrid.HybridCNNTransformer`; for ``small_cnn`` ``width``,
        ``dropout``; for ``googlenet`` ``dropout``; for timm models anything
        ``timm.create_model`` accepts (``img_size``, ``drop_rate``...). Every model also takes
        ``freeze_fraction`` (default 0.8 for the hybrid, 0 otherwise; see
        :func:`~kidneyscan.models.weights.freeze_backbone`) and ``image_size``, the training
        input side: the hybrid sizes its position embeddings from it, fixed-size transformers
        (ViT, Swin) get it as ``img_size``, CNNs ignore it. Pass it always.

    Returns
    -------
    nn.Module
        Logits model with ``forward_features``, ``forward_head`` and ``kidneyscan_spec``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if pretrained and weights is not None:
        raise ValueError("give pretrained=True (hub) or weights=PATH (local), not both")
    spec_kwargs = {"in_chans": in_chans, **kwargs}
    try:
        json.dumps(spec_kwargs)
    except TypeError as exc:
        raise ValueError(
            f"model options must be JSON-serialisable (stored in checkpoints): {exc}"
        ) from exc

    model: nn.Module
    if name == "hybrid":
        try:
            model = HybridCNNTransformer(
                num_classes, in_chans=in_chans, pretrained=pretrained, weights=weights, **kwargs
            )
        except TypeError as exc:
            raise ValueError(f"bad option for model 'hybrid': {exc}") from exc
        spec_kwargs.update(model.options)
    else:
        freeze = float(kwargs.pop("freeze_fraction", 0.0))
        # CNNs take any size; only fixed-size transformers (ViT, Swin) need it, as img_size.
        image_size = kwargs.pop("image_size", None)
        image_width = kwargs.pop("image_width", None)
        if image_size is not None and image_width is not None:
            image_size = [int(image_size), int(image_width)]
        if name == "small_cnn":
            if pretrained:
                raise ValueError("small_cnn has no pretrained weights (it is trained from scratch)")
            try:
                model = SmallCNN(num_classes, in_chans=in_chans, **kwargs)
            except TypeError as exc:
                raise ValueError(f"bad option for model 'small_cnn': {exc}") from exc
        elif name == "googlenet":
            try:
                model = GoogLeNetClassifier(
                    num_classes, in_chans=in_chans, pretrained=pretrained, **kwargs
                )
            except TypeError as exc:
                raise ValueError(f"bad option for model 'googlenet': {exc}") from exc
        else:
            arch = resolve_name(name)
            if not timm.is_model(arch):
                raise ValueError(
                    f"unknown model {name!r}; project names: {', '.join(MODEL_NAMES)}, "
                    "or any timm model name (timm.list_models())"
                )
            if image_size is not None and _fixed_input_size(arch):
                kwargs.setdefault("img_size", image_size)
            model = create_timm_model(
                arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
            )
        if weights is not None:
            target = model.net if isinstance(model, GoogLeNetClassifier) else model
            load_weights(target, weights)
        if freeze:
            freeze_backbone(model, freeze)
    model.kidneyscan_spec = {"name": name, "kwargs": spec_kwargs}  # type: ignore[assignment]
    return model


def default_weights(name: str, **kwargs: Any) -> str | None:
    """The offline weight source a model starts from by default (:data:`DEFAULT_WEIGHTS`).

    For the hybrid this is its backbone's (``astra`` for the default ``ct_resnet152``); ``None``
    when the architecture has no offline weights (it then needs ``pretrained`` or ``weights``).
    """
    return model_entry(name).default_weights(**kwargs)


def weights_provenance(model: nn.Module) -> dict[str, Any] | None:
    """Where the model's pretrained weights came from: source, SHA-256, tensors matched.

    ``None`` when no weights were loaded (random initialisation or hub weights).
    """
    for m in model.modules():
        info = getattr(m, "kidneyscan_weights", None)
        if isinstance(info, dict):
            return dict(info)
    return None


def _fixed_input_size(arch: str) -> bool:
    pcfg = timm.get_pretrained_cfg(arch)
    return bool(pcfg is not None and pcfg.to_dict().get("fixed_input_size", False))


def model_spec(model: nn.Module) -> dict[str, Any]:
    """``{"name", "kwargs"}`` that rebuilds ``model`` with :func:`create_classifier`.

    Raises
    ------
    ValueError
        The model was not built by :func:`create_classifier`.
    """
    spec = getattr(model, "kidneyscan_spec", None)
    if not isinstance(spec, dict):
        raise ValueError("model was not built by create_classifier (no kidneyscan_spec)")
    return {"name": spec["name"], "kwargs": dict(spec["kwargs"])}


def default_cfg(name: str, **kwargs: Any) -> dict[str, Any]:
    """Input size, mean and std a model expects (timm ``resolve_data_config``).

    Parameters
    ----------
    name
        Any name :func:`create_classifier` accepts.
    **kwargs
        The same model options (``image_size`` / ``backbone`` for the hybrid, ``img_size``
        for ViT / Swin) so the size matches what will be built.

    Returns
    -------
    dict
        ``input_size`` (C, H, W), ``image_size`` (H), ``image_width`` (W), ``mean``, ``std``,
        ``interpolation``, ``crop_pct``.
    """
    return model_entry(name).data_config(**kwargs)


def model_preprocessor(
    name: str,
    model_kwargs: dict[str, Any] | None = None,
    *,
    steps: list[dict[str, Any]] | None = None,
    image_size: int = 224,
    image_width: int | None = None,
    in_chans: int = 3,
) -> Preprocessor:
    """The :class:`~kidneyscan.preprocess.pipeline.Preprocessor` for a model: the given steps
    and size, normalisation from the model's data config (:func:`default_cfg`).

    The one place normalisation is decided: central training, federated training, the
    service and the ONNX export all get it from here (through the checkpoint's metadata).
    Mean and std follow the architecture (the CT window mapped to Merlin's HU scale for
    ``ct_resnet152``, 0.5 / 0.5 for EfficientNet-Lite, ImageNet statistics for ConvNeXt);
    names unknown to timm keep ImageNet's.
    """
    kwargs = {**(model_kwargs or {}), "image_size": image_size}
    try:
        dc = default_cfg(name, **kwargs)
        mean, std = tuple(dc["mean"]), tuple(dc["std"])
    except ValueError:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return Preprocessor(
        steps=list(steps or []),
        image_size=image_size,
        image_width=image_width,
        in_chans=in_chans,
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------- model queries
def gradcam_target_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose activations Grad-CAM should use: a spatial stage, last of the backbone.

    Each model's registry entry names it (:mod:`kidneyscan.models.registry`): the hybrid's
    token layer, the last conv stage of a CNN (timm ``feature_info``); ViT / Swin outputs are
    token grids: use :func:`gradcam_reshape_transform` with them.
    """
    inner = unwrap_model(model)
    return [entry_of(inner).gradcam_layer(inner)]


def gradcam_reshape_transform(
    model: nn.Module,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For transformer baselines, a function turning the target layer output into NCHW.

    Returns ``None`` for models whose target layer already gives ``(B, C, h, w)``.
    """
    inner = unwrap_model(model)
    return entry_of(inner).reshape_transform(inner)


def trainable_state_keys(model: nn.Module) -> list[str]:
    """Names of parameters with ``requires_grad``, in ``named_parameters`` order.

    The order is the module registration order, so it is the same on every client that builds
    the model from the same spec; the federated area exchanges only these tensors.
    """
    return [name for name, p in model.named_parameters() if p.requires_grad]


__all__ = [
    "DEFAULT_WEIGHTS",
    "HYBRID_BACKBONE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_NAMES",
    "TIMM_ALIASES",
    "GoogLeNetClassifier",
    "PretrainedUnavailableWarning",
    "SmallCNN",
    "create_classifier",
    "default_cfg",
    "default_weights",
    "gradcam_reshape_transform",
    "gradcam_target_layers",
    "model_entry",
    "model_preprocessor",
    "model_spec",
    "resolve_name",
    "trainable_state_keys",
    "weights_provenance",
]
