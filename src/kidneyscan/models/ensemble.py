"""Soft-voting ensemble of saved checkpoints (e.g. DenseNet169 + MobileNetV2 + GoogLeNet).

Each member's logits are divided by its calibration temperature (``metadata.json``
``temperature``), turned into probabilities, and the probabilities are averaged, optionally
weighted (e.g. by each member's validation macro-F1). ``forward`` returns the **log** of the
averaged probabilities: valid logits whose softmax is exactly the averaged distribution, so the
ensemble drops into code written for single models (evaluation, temperature scaling, Grad-CAM
excluded).

Preprocessing: members may have been trained with different preprocessing (e.g. Inception-v3 at
299 px, others at 224 px). The ensemble therefore keeps every member's own
:class:`~kidneyscan.preprocess.pipeline.Preprocessor`; :meth:`SoftVotingEnsemble.predict_images`
runs each member on its own input. ``forward(x)`` with one tensor is allowed only when all
members share one preprocessing (``shared_preprocessing``); otherwise pass a list with one
tensor per member.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn


class EnsembleError(ValueError):
    """Ensemble members or weights are inconsistent."""


class SoftVotingEnsemble(nn.Module):
    """Average of the members' (temperature-scaled) softmax probabilities.

    Parameters
    ----------
    models
        Member classifiers, each mapping its input to ``(B, num_classes)`` logits.
    weights
        Non-negative voting weights (normalised to sum 1); ``None`` = equal weights.
    temperatures
        Per-member calibration temperatures (logits are divided by them); ``None`` = 1.
    preprocessing
        Per-member ``Preprocessor.to_dict()`` payloads, or ``None`` when the caller
        feeds inputs itself.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        *,
        temperatures: Sequence[float] | None = None,
        preprocessing: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if len(models) < 1:
            raise EnsembleError("an ensemble needs at least one model")
        n = len(models)
        w = torch.ones(n) if weights is None else torch.as_tensor(list(weights), dtype=torch.float)
        if w.shape != (n,):
            raise EnsembleError(f"{n} models but {w.numel()} weights")
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise EnsembleError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
        t = torch.ones(n) if temperatures is None else torch.as_tensor(list(temperatures)).float()
        if t.shape != (n,) or not torch.isfinite(t).all() or (t <= 0).any():
            raise EnsembleError(f"need {n} positive temperatures, got {t.tolist()}")
        if preprocessing is not None and len(preprocessing) != n:
            raise EnsembleError(f"{n} models but {len(preprocessing)} preprocessing entries")
        self.members = nn.ModuleList(models)
        self.weights: torch.Tensor
        self.temperatures: torch.Tensor
        self.register_buffer("weights", w / w.sum())
        self.register_buffer("temperatures", t)
        self.preprocessing = [dict(p) for p in preprocessing] if preprocessing else None

    @property
    def shared_preprocessing(self) -> dict[str, Any] | None:
        """The members' common preprocessing, or ``None`` if they differ or are unknown."""
        if not self.preprocessing:
            return None
        first = self.preprocessing[0]
        return first if all(p == first for p in self.preprocessing[1:]) else None

    def predict_proba(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Weighted mean of the members' probabilities, ``(B, num_classes)``.

        Parameters
        ----------
        x
            One batch for every member (shared preprocessing), or a list with one batch per
            member (same batch size).
        """
        if isinstance(x, torch.Tensor):
            if self.preprocessing is not None and self.shared_preprocessing is None:
                raise EnsembleError(
                    "members use different preprocessing: pass one input per member "
                    "(or use predict_images)"
                )
            inputs: Sequence[torch.Tensor] = [x] * len(self.members)
        else:
            inputs = list(x)
            if len(inputs) != len(self.members):
                raise EnsembleError(f"{len(self.members)} members but {len(inputs)} inputs")
        probs = None
        for i, (member, inp) in enumerate(zip(self.members, inputs, strict=True)):
            p = torch.softmax(member(inp) / self.temperatures[i], dim=-1)
            if probs is not None and p.shape != probs.shape:
                raise EnsembleError(
                    f"member {i} gives {tuple(p.shape)}, member 0 {tuple(probs.shape)}"
                )
            probs = self.weights[i] * p if probs is None else probs + self.weights[i] * p
        assert probs is not None
        return probs

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``log`` of :meth:`predict_proba`: logits whose softmax is the ensemble vote."""
        return torch.log(self.predict_proba(x).clamp_min(1e-12))

    @torch.no_grad()
    def predict_images(self, images: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
        """Probabilities for raw float32 (H, W) images in [0, 1], each member preprocessing
        them its own way.

        Returns
        -------
        numpy.ndarray
            ``(N, num_classes)`` float32 probabilities.
        """
        from kidneyscan.preprocess.pipeline import Preprocessor

        if self.preprocessing is None:
            raise EnsembleError("predict_images needs each member's preprocessing")
        preps = [Preprocessor.from_dict(p) for p in self.preprocessing]
        out: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batches = [torch.stack([prep(img) for img in chunk]) for prep in preps]
            out.append(self.predict_proba(batches).float().numpy())
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


def _metric(meta: dict[str, Any], path: str, ckpt: str) -> float:
    node: Any = meta.get("metrics", {})
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise EnsembleError(f"{ckpt}: metrics has no {path!r} to weight the vote by")
        node = node[part]
    try:
        return float(node)
    except (TypeError, ValueError) as exc:
        raise EnsembleError(f"{ckpt}: metrics {path!r} is not a number: {node!r}") from exc


def load_ensemble(
    checkpoint_dirs: Sequence[str | Path],
    weights: Sequence[float] | str | None = None,
) -> tuple[SoftVotingEnsemble, dict[str, Any]]:
    """Build a soft-voting ensemble from checkpoint folders.

    Parameters
    ----------
    checkpoint_dirs
        Folders written by :func:`~kidneyscan.models.checkpoint.save_checkpoint`.
    weights
        ``None`` (equal), explicit numbers, or a dotted key into each member's ``metrics``
        (e.g. ``"val.macro_f1"``) to weight members by a validation score.

    Returns
    -------
    (SoftVotingEnsemble, dict)
        The ensemble (eval mode) and metadata: ``classes``, ``task``, ``members`` (name, dir,
        weight, temperature), ``preprocessing`` (shared one or ``None``) and
        ``member_preprocessing``.

    Raises
    ------
    EnsembleError
        Fewer than one checkpoint, different class lists or tasks, or bad weights.
    """
    from kidneyscan.models.checkpoint import load_checkpoint

    dirs = [str(d) for d in checkpoint_dirs]
    if not dirs:
        raise EnsembleError("no checkpoints given")
    models, metas = [], []
    for d in dirs:
        model, meta = load_checkpoint(d)
        models.append(model)
        metas.append(meta)
    classes = metas[0]["classes"]
    for d, meta in zip(dirs[1:], metas[1:], strict=True):
        if meta["classes"] != classes:
            raise EnsembleError(
                f"{d} predicts {meta['classes']}, {dirs[0]} predicts {classes}: "
                "members must share classes in the same order"
            )
        if meta.get("task") != metas[0].get("task"):
            raise EnsembleError(f"{d} task {meta.get('task')!r} != {metas[0].get('task')!r}")
    if isinstance(weights, str):
        w: list[float] | None = [_metric(m, weights, d) for m, d in zip(metas, dirs, strict=True)]
    else:
        w = None if weights is None else [float(v) for v in weights]
    temps = [float(m.get("temperature", 1.0) or 1.0) for m in metas]
    ens = SoftVotingEnsemble(
        models, w, temperatures=temps, preprocessing=[m["preprocessing"] for m in metas]
    ).eval()
    info = {
        "classes": classes,
        "task": metas[0].get("task"),
        "members": [
            {
                "name": m["model"]["name"],
                "dir": d,
                "weight": float(ens.weights[i]),
                "temperature": temps[i],
            }
            for i, (m, d) in enumerate(zip(metas, dirs, strict=True))
        ],
        "preprocessing": ens.shared_preprocessing,
        "member_preprocessing": ens.preprocessing,
    }
    return ens, info
