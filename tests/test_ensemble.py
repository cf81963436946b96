"""Soft-voting ensemble: averaging equals the manual mean; checkpoint loading checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kidneyscan.models.checkpoint import save_checkpoint
from kidneyscan.models.ensemble import EnsembleError, SoftVotingEnsemble, load_ensemble
from kidneyscan.models.factory import create_classifier

CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]


def _prep(size: int) -> dict:
    return {"steps": [], "image_size": size, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3}


def _members(n: int = 3) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [create_classifier("small_cnn", 4, width=4).eval() for _ in range(n)]


def test_equal_weights_average_equals_manual_mean() -> None:
    # Prepare
    members = _members()
    x = torch.randn(5, 3, 32, 32)
    manual = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
    # Execute
    ens = SoftVotingEnsemble(members).eval()
    probs = ens.predict_proba(x)
    # Assert
    torch.testing.assert_close(probs, manual)
    torch.testing.assert_close(ens(x).softmax(-1), manual)  # forward returns log-probs
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def test_weights_and_temperatures() -> None:
    members = _members()
    x = torch.randn(4, 3, 32, 32)
    w = [0.9, 0.6, 0.3]
    t = [1.0, 2.0, 0.5]
    manual = sum(wi * (m(x) / ti).softmax(-1) for wi, m, ti in zip(w, members, t, strict=True))
    ens = SoftVotingEnsemble(members, w, temperatures=t)
    torch.testing.assert_close(ens.predict_proba(x), manual / sum(w))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0]}, "3 models but 1 weights"),
        ({"weights": [1.0, -1.0, 1.0]}, ">= 0"),
        ({"weights": [0.0, 0.0, 0.0]}, "not all 0"),
        ({"temperatures": [1.0, 0.0, 1.0]}, "positive temperatures"),
    ],
)
def test_bad_weights_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(EnsembleError, match=message):
        SoftVotingEnsemble(_members(), **kwargs)


def test_load_ensemble_weighted_by_metric(tmp_path: Path) -> None:
    # Prepare: three checkpoints with different validation F1 and one temperature
    dirs = []
    for i, (m, f1) in enumerate(zip(_members(), [0.8, 0.6, 0.6], strict=True)):
        meta = {
            "classes": CLASSES,
            "preprocessing": _prep(32),
            "metrics": {"val": {"macro_f1": f1}},
            "temperature": 1.5 if i == 0 else 1.0,
        }
        dirs.append(save_checkpoint(tmp_path / f"m{i}", m, meta))
    # Execute
    ens, info = load_ensemble(dirs, weights="val.macro_f1")
    # Assert
    torch.testing.assert_close(ens.weights, torch.tensor([0.4, 0.3, 0.3]))
    assert [m["temperature"] for m in info["members"]] == [1.5, 1.0, 1.0]
    assert info["classes"] == CLASSES
    assert info["preprocessing"] == _prep(32)
    images = [np.random.default_rng(i).random((40, 40), dtype=np.float32) for i in range(3)]
    probs = ens.predict_images(images)
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    with pytest.raises(EnsembleError, match="no 'val.f1'"):
        load_ensemble(dirs, weights="val.f1")


def test_members_with_different_preprocessing_get_their_own_inputs(tmp_path: Path) -> None:
    a, b = _members(2)
    save_checkpoint(tmp_path / "a", a, {"classes": CLASSES, "preprocessing": _prep(32)})
    save_checkpoint(tmp_path / "b", b, {"classes": CLASSES, "preprocessing": _prep(48)})
    ens, info = load_ensemble([tmp_path / "a", tmp_path / "b"])
    assert info["preprocessing"] is None
    with pytest.raises(EnsembleError, match="different preprocessing"):
        ens(torch.randn(1, 3, 32, 32))
    image = np.full((64, 64), 0.5, dtype=np.float32)
    from kidneyscan.preprocess.pipeline import Preprocessor

    xa = Preprocessor.from_dict(_prep(32))(image)[None]
    xb = Preprocessor.from_dict(_prep(48))(image)[None]
    expected = (a(xa).softmax(-1) + b(xb).softmax(-1)) / 2
    np.testing.assert_allclose(ens.predict_images([image]), expected.detach().numpy(), rtol=1e-5)


def test_members_must_share_classes(tmp_path: Path) -> None:
    a, b = _members(2)
    save_checkpoint(tmp_path / "a", a, {"classes": CLASSES, "preprocessing": _prep(32)})
    other = ["Normal", "Cyst", "Stone", "Tumor"]
    save_checkpoint(tmp_path / "b", b, {"classes": other, "preprocessing": _prep(32)})
    with pytest.raises(EnsembleError, match="share classes"):
        load_ensemble([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(EnsembleError, match="no checkpoints"):
        load_ensemble([])
