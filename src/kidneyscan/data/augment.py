"""Training-time augmentation of resized grayscale CT images (training split only).

Augmentation works on the float image in [0, 1] *after* the preprocessing steps and resize and
*before* normalisation, so noise levels and brightness changes mean the same thing for every
model. Geometric ops and brightness/contrast come from ``torchvision.transforms.v2``; salt
noise is a small custom op. All randomness comes from torch's generator, which
:func:`kidneyscan.engine.set_seed` and the DataLoader's seeded generator make reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.v2 as T


class SaltPepperNoise(torch.nn.Module):
    """Set a random fraction of pixels to 0 or 1 (impulse noise, e.g. detector defects).

    Parameters
    ----------
    amount
        Largest fraction of pixels replaced; each call draws a fraction in [0, amount].
    p
        Probability of applying the op at all.
    """

    def __init__(self, amount: float = 0.01, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= amount <= 1:
            raise ValueError(f"amount must be in [0, 1], got {amount}")
        self.amount = amount
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Apply to a float tensor (..., H, W) in [0, 1]."""
        if self.amount == 0 or torch.rand(()) >= self.p:
            return image
        frac = float(torch.rand(())) * self.amount
        u = torch.rand(image.shape[-2:])
        out = image.clone()
        out[..., u < frac / 2] = 0.0
        out[..., (u >= frac / 2) & (u < frac)] = 1.0
        return out


class GaussianNoise(torch.nn.Module):
    """Add zero-mean Gaussian noise with a random sigma in [0, sigma] (quantum noise).

    Parameters
    ----------
    sigma
        Largest standard deviation, in units of the [0, 1] intensity range.
    p
        Probability of applying the op.
    """

    def __init__(self, sigma: float = 0.03, p: float = 0.5) -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = sigma
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Apply to a float tensor in [0, 1]; the result is clipped to [0, 1]."""
        if self.sigma == 0 or torch.rand(()) >= self.p:
            return image
        s = float(torch.rand(())) * self.sigma
        return (image + torch.randn_like(image) * s).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the training augmentation (defaults are mild: CT geometry is regular).

    Parameters
    ----------
    hflip
        Probability of a left-right flip.
    vflip
        Probability of an up-down flip (0 by default: patients lie on a table, so anatomy has a
        fixed up-down orientation in axial slices).
    degrees
        Largest rotation in degrees.
    scale
        Range of isotropic scaling.
    translate
        Largest shift as a fraction of the side.
    brightness, contrast
        ColorJitter factors.
    salt
        Largest fraction of salt-and-pepper pixels.
    noise_sigma
        Largest Gaussian noise sigma (intensity units).
    """

    hflip: float = 0.5
    vflip: float = 0.0
    degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.15
    contrast: float = 0.15
    salt: float = 0.01
    noise_sigma: float = 0.03


def build_augmentation(cfg: AugmentConfig | None = None) -> T.Compose:
    """Compose the training augmentation for float (1, S, S) tensors in [0, 1].

    Parameters
    ----------
    cfg
        Augmentation strengths; defaults to :class:`AugmentConfig`.

    Returns
    -------
    torchvision.transforms.v2.Compose
        Callable mapping a (1, S, S) float tensor to an augmented tensor of the same shape.
    """
    cfg = cfg or AugmentConfig()
    ops: list[torch.nn.Module] = []
    if cfg.hflip > 0:
        ops.append(T.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        ops.append(T.RandomVerticalFlip(p=cfg.vflip))
    if cfg.degrees > 0 or cfg.scale != (1.0, 1.0) or cfg.translate > 0:
        ops.append(
            T.RandomAffine(
                degrees=cfg.degrees,
                translate=(cfg.translate, cfg.translate) if cfg.translate > 0 else None,
                scale=cfg.scale,
                interpolation=T.InterpolationMode.BILINEAR,
                fill=0.0,
            )
        )
    if cfg.brightness > 0 or cfg.contrast > 0:
        ops.append(T.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
    ops.append(GaussianNoise(cfg.noise_sigma))
    ops.append(SaltPepperNoise(cfg.salt))
    return T.Compose(ops)
