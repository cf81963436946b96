"""Run configuration: frozen dataclasses loaded from TOML or YAML and saved beside every result.

A config file may hold the whole :class:`ExperimentConfig` (model, input size, task,
preprocessing steps) with the training recipe under a ``train`` table, or only the keys of
:class:`TrainConfig` at top level. Unknown keys are an error naming the key, so a typo never
silently falls back to a default.

Example (``run.yaml``)::

    model: hybrid
    image_size: 128
    task: multiclass
    model_kwargs: {backbone: convnext_atto}
    train:
      epochs: 20
      lr: 0.0005
      class_weighting: sampler
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CLASS_WEIGHTING = ("loss", "sampler", "none")
TASKS = ("multiclass", "stone-vs-normal")


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe shared by central and federated training.

    Parameters
    ----------
    epochs
        Maximum number of passes over the training split.
    batch_size
        Mini-batch size.
    lr
        Peak learning rate of AdamW (reached after warm-up, then cosine decay to zero).
    weight_decay
        AdamW decoupled weight decay (not applied to biases and normalisation weights).
    warmup_epochs
        Linear warm-up length in epochs (may be fractional).
    label_smoothing
        Cross-entropy label smoothing.
    class_weighting
        ``"loss"`` (inverse-frequency class weights in the loss), ``"sampler"`` (balanced
        sampling with replacement) or ``"none"``.
    smote
        After training, refit the classifier head on SMOTE-resampled penultimate embeddings of
        the training split (see :func:`kidneyscan.engine.smote_refit_head`).
    early_stopping_patience
        Stop after this many epochs without a better validation macro-F1 (0 disables).
    seed
        Seed for Python, NumPy, torch, shuffling and augmentation.
    num_workers
        DataLoader worker processes.
    bf16
        bfloat16 autocast in training (CPUs with AVX-512 BF16 / AMX run it about 1.5x faster).
        ``None`` (default): on when training the tail on cached features and the CPU runs
        bf16 natively, off otherwise. Final validation and test logits are always fp32, the
        precision the checkpoint is served in.
    channels_last
        Channels-last memory format for 4-D tensors (helps convolutions on recent CPUs).
    augment
        Augment the training split (flips, rotation, scaling, noise, brightness/contrast).
    smote_epochs
        Epochs of head-only training on the SMOTE-resampled embeddings.
    cache_images
        Keep preprocessed images in memory between epochs (faster; RAM = N * S * S * 4 bytes).
    cache_features
        When the model has a frozen backbone prefix (a pretrained hybrid), compute the prefix's
        output once per image and train only the rest on it (:mod:`kidneyscan.features`;
        on disk under ``$KIDNEYSCAN_CACHE``). Pixel augmentation is then replaced by the
        stored ``feature_views``.
    feature_views
        Views cached per image: ``orig`` and optionally ``hflip`` (the mirrored image; training
        draws one view per image and epoch).
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weighting: str = "loss"
    smote: bool = False
    early_stopping_patience: int = 5
    seed: int = 0
    num_workers: int = 0
    bf16: bool | None = None
    channels_last: bool = False
    augment: bool = True
    smote_epochs: int = 30
    cache_images: bool = False
    cache_features: bool = True
    feature_views: list[str] = field(default_factory=lambda: ["orig", "hflip"])

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(
                f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.class_weighting not in CLASS_WEIGHTING:
            raise ConfigError(
                f"train.class_weighting must be one of {CLASS_WEIGHTING}, "
                f"got {self.class_weighting!r}"
            )
        if self.early_stopping_patience < 0:
            raise ConfigError("train.early_stopping_patience must be >= 0")
        if self.num_workers < 0:
            raise ConfigError("train.num_workers must be >= 0")
        if self.smote_epochs < 1:
            raise ConfigError("train.smote_epochs must be >= 1")
        views = list(self.feature_views)
        if not views or views[0] != "orig" or not set(views) <= {"orig", "hflip"}:
            raise ConfigError(
                f"train.feature_views must start with 'orig' (then optionally 'hflip'), got {views}"
            )
        object.__setattr__(self, "feature_views", views)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys raise :class:`ConfigError`."""
        return _build(cls, d, "train")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a central training run needs besides the data location.

    Parameters
    ----------
    model
        Name for :func:`kidneyscan.models.factory.create_classifier` (``hybrid``, ``resnet50``...).
    model_kwargs
        Extra keyword arguments for the factory (e.g. ``{"backbone": "convnext_atto"}``).
    image_size
        Input height in pixels (and width unless ``image_width`` is given).
    image_width
        Input width in pixels. ``None`` (default): the kidney band's 3:2 when the steps start
        with ``crop_kidney_band`` (224 x 336 by default), else the model's own aspect.
    in_chans
        1 or 3 input channels (grayscale repeated for 3).
    task
        ``multiclass`` (Cyst/Normal/Stone/Tumor) or ``stone-vs-normal`` (two classes).
    steps
        Preprocessing steps for :class:`kidneyscan.preprocess.pipeline.Preprocessor`
        (default: the kidney-band crop).
    pretrained
        Ask the factory for hub weights (needs internet; warns and falls back offline).
    weights
        Local weights file for the backbone, a named source (``astra``,
        ``efficientnet-lite0``) or ``none`` for random initialisation. ``None`` (the default)
        uses the model's offline default weights where it has them
        (:func:`kidneyscan.models.factory.default_weights`: ``astra`` for ``ct_resnet152``).
    train
        The training recipe.
    """

    model: str = "hybrid"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    image_width: int | None = None
    in_chans: int = 3
    task: str = "multiclass"
    steps: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "crop_kidney_band"}])
    pretrained: bool = False
    weights: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.image_size < 8:
            raise ConfigError(f"image_size must be >= 8, got {self.image_size}")
        if self.image_width is not None and self.image_width < 8:
            raise ConfigError(f"image_width must be >= 8 or null, got {self.image_width}")
        if self.in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {self.in_chans}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Build from a dict; a top-level dict of only training keys is accepted too."""
        d = dict(d)
        train_keys = {f.name for f in fields(TrainConfig)}
        own_keys = {f.name for f in fields(cls)}
        # A file holding only the training recipe at top level is the common short form.
        loose = {k: d.pop(k) for k in list(d) if k in train_keys and k not in own_keys}
        train = dict(d.pop("train", None) or {})
        if not isinstance(train, dict):
            raise ConfigError("'train' must be a table/mapping of training options")
        overlap = set(loose) & set(train)
        if overlap:
            raise ConfigError(f"keys given both at top level and under 'train': {sorted(overlap)}")
        train.update(loose)
        d["train"] = TrainConfig.from_dict(train)
        return _build(cls, d, "config")

    def replace(self, **changes: Any) -> ExperimentConfig:
        """Copy with some fields changed (``train`` may be a dict of training overrides)."""
        if isinstance(changes.get("train"), dict):
            changes["train"] = dataclasses.replace(self.train, **changes["train"])
        return dataclasses.replace(self, **changes)


def _build(cls: Any, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if value is None and "None" in str(names[key].type):
            kwargs[key] = None
            continue
        default = getattr(cls(), key) if key != "train" else None
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key}: expected true/false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
            if type(default) is int and isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
            value = type(default)(value) if type(default) is int else value
        if isinstance(default, float) and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def load_config(path: str | Path) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file.

    Raises
    ------
    ConfigError
        If the file is missing, unparsable, or holds unknown keys or bad values.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{p}: unknown config format (use .toml, .yaml, .yml or .json)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: cannot parse config ({exc})") from exc
    try:
        return ExperimentConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc
    except TypeError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def save_config(cfg: ExperimentConfig | TrainConfig, path: str | Path) -> Path:
    """Write a config as YAML (``.yaml``) or JSON (any other suffix); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = cfg.to_dict()
    if p.suffix.lower() in (".yaml", ".yml"):
        p.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        p.write_text(json.dumps(data, indent=2))
    return p
