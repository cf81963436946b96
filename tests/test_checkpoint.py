"""Checkpoint folders: round-trip with identical predictions, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kidneyscan.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    sha256_file,
)
from kidneyscan.models.factory import create_classifier

CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]
PREP = {"steps": [], "image_size": 64, "in_chans": 3}
TINY_HYBRID = {
    "backbone": "convnext_atto",
    "image_size": 64,
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 4,
}


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("hybrid", TINY_HYBRID),
        ("small_cnn", {"width": 8}),
        ("resnet10t", {"freeze_fraction": 0.5}),
    ],
)
def test_round_trip_gives_identical_predictions(tmp_path: Path, name: str, kwargs: dict) -> None:
    # Prepare: a model whose weights differ from a fresh init
    torch.manual_seed(0)
    model = create_classifier(name, 4, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    # Execute: no "model" key -> taken from the model's spec
    save_checkpoint(tmp_path / "ck", model, {"classes": CLASSES, "preprocessing": PREP})
    torch.manual_seed(123)  # a different init must not matter
    loaded, meta = load_checkpoint(tmp_path / "ck")
    # Assert
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert meta["model"]["name"] == name
    assert meta["temperature"] == 1.0
    assert meta["weights_sha256"] == sha256_file(tmp_path / "ck" / "model.safetensors")
    assert not loaded.training
    # Same trainable parameters after reload (federated clients rebuild from checkpoints).
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]


def test_weight_sources_are_not_reloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a model built from a local weights file, which is then deleted
    src = create_classifier("small_cnn", 4, width=8)
    wfile = tmp_path / "init.pth"
    torch.save(src.state_dict(), wfile)
    model = create_classifier("small_cnn", 4, width=8, weights=str(wfile)).eval()
    meta = {"classes": CLASSES, "preprocessing": PREP}
    meta["model"] = {"name": "small_cnn", "kwargs": {"width": 8, "weights": str(wfile)}}
    save_checkpoint(tmp_path / "ck", model, meta)
    wfile.unlink()
    # Execute
    loaded, meta_out = load_checkpoint(tmp_path / "ck")
    # Assert
    assert "weights" not in meta_out["model"]["kwargs"]
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def test_tampered_weights_are_detected(tmp_path: Path) -> None:
    model = create_classifier("small_cnn", 4, width=8)
    save_checkpoint(tmp_path, model, {"classes": CLASSES, "preprocessing": PREP})
    with (tmp_path / "model.safetensors").open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path)


def test_mismatched_architecture_is_an_error(tmp_path: Path) -> None:
    model = create_classifier("small_cnn", 4, width=8)
    save_checkpoint(tmp_path, model, {"classes": CLASSES, "preprocessing": PREP})
    meta = read_metadata(tmp_path)
    meta["model"]["kwargs"]["width"] = 16
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path)


def test_missing_pieces_raise(tmp_path: Path) -> None:
    model = create_classifier("small_cnn", 4, width=8)
    with pytest.raises(CheckpointError, match="preprocessing"):
        save_checkpoint(tmp_path / "a", model, {"classes": CLASSES})
    with pytest.raises(CheckpointError, match="metadata.json"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(tmp_path / "b", model, {"classes": CLASSES, "preprocessing": PREP})
    meta = read_metadata(tmp_path / "b")
    meta["model"]["name"] = "no_such_model"
    (tmp_path / "b" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        load_checkpoint(tmp_path / "b")
