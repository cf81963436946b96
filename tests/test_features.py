"""Frozen-prefix features on disk, and central training on them (the default recipe's path)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kidneyscan.config import ExperimentConfig, TrainConfig
from kidneyscan.data.datasets import load_image, scan_dataset
from kidneyscan.experiment import checkpoint_probs, train_central
from kidneyscan.features import FeatureStore
from kidneyscan.models.factory import create_classifier
from kidneyscan.models.frozen import FrozenSplit
from kidneyscan.preprocess.pipeline import Preprocessor

#: The default recipe's structure (CT-style ResNet, layer3 tokens pooled 2 x 2, flip TTA, fully
#: frozen) on a tiny random ResNet so the suite stays fast.
TINY = {
    "backbone": "resnet10t",
    "token_stage": 2,
    "token_pool": 2,
    "flip_tta": True,
    "freeze_fraction": 1.0,
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 4,
}
PRE = Preprocessor(steps=[{"name": "crop_kidney_band"}], image_size=64, image_width=96)


def _split() -> FrozenSplit:
    torch.manual_seed(0)
    model = create_classifier("hybrid", 4, image_size=64, image_width=96, **TINY)
    return FrozenSplit(model.eval())


def test_store_computes_each_image_once_keyed_by_content(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    samples = scan_dataset(phantom_dir)[:6]
    split = _split()
    calls: list[int] = []
    original = FrozenSplit.features

    def counting(self: FrozenSplit, x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return original(self, x)

    monkeypatch.setattr(FrozenSplit, "features", counting)
    store = FeatureStore(split, PRE, root=tmp_path / "cache", compute="fp32", batch_size=4)
    # Execute: extract, reload, reload a renamed copy of one image
    first = store.load(samples)
    n_first = sum(calls)
    again = store.load(samples)
    copy = tmp_path / "renamed.jpg"
    shutil.copy(samples[0].path, copy)
    renamed = store.load([type(samples[0])(copy, samples[0].label, "Cyst", "x")])
    # Assert: 6 images x 2 views once, nothing recomputed, the copy hit the cache
    assert n_first == 12 and sum(calls) == 12
    assert first.features.shape[:2] == (6, 2) and first.features.dtype == torch.bfloat16
    torch.testing.assert_close(again.features, first.features)
    torch.testing.assert_close(renamed.features[0], first.features[0])
    assert first.rois[0]["source"] in ("spine", "body")
    # the stored hflip view is the prefix output of the mirrored image (not a flipped map)
    x = PRE(load_image(samples[0].path))
    mirrored = original(split, x[None].flip(-1))[0].to(torch.bfloat16)
    torch.testing.assert_close(first.features[0, 1], mirrored, atol=0.02, rtol=0.02)
    # each image of every batch (the next one is preprocessed while the prefix runs) keeps
    # its own features and box
    for i in (3, 4, 5):
        xi = PRE(load_image(samples[i].path))
        own = original(split, xi[None])[0].to(torch.bfloat16)
        torch.testing.assert_close(first.features[i, 0], own, atol=0.02, rtol=0.02)
        assert first.rois[i] == PRE.apply_steps_with_roi(load_image(samples[i].path))[1]


def test_onnx_engine_stores_the_torch_features_and_exports_once(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the same images through the PyTorch fp32 prefix and through ONNX Runtime
    samples = scan_dataset(phantom_dir)[:4]
    split = _split()
    ref = FeatureStore(split, PRE, root=tmp_path / "torch", compute="fp32").load(samples)
    exports: list[int] = []
    import kidneyscan.export.onnx as onnx_mod

    original = onnx_mod.export_bytes

    def counting(*args: object, **kwargs: object) -> bytes:
        exports.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_mod, "export_bytes", counting)
    # Execute: extract, then a second store (another run) on new images of the same cache
    store = FeatureStore(split, PRE, root=tmp_path / "onnx", compute="onnx", batch_size=3)
    got = store.load(samples)
    later = FeatureStore(split, PRE, root=tmp_path / "onnx", compute="onnx")
    later.load(scan_dataset(phantom_dir)[4:6])
    # Assert: both views equal PyTorch's within bf16 storage, one export for both runs
    torch.testing.assert_close(got.features.float(), ref.features.float(), atol=0.02, rtol=0.02)
    assert exports == [1] and store.folder != FeatureStore(split, PRE, compute="fp32").folder
    assert sorted(p.name for p in store.folder.glob("*.onnx")) == ["prefix_3x64x96.onnx"]
    with pytest.raises(ValueError, match="compute must be 'auto' or one of"):
        FeatureStore(split, PRE, compute="int8")


def test_auto_engine_falls_back_to_torch_when_the_export_fails(
    phantom_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import kidneyscan.export.onnx as onnx_mod
    import kidneyscan.features as features_mod

    def broken(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_mod, "export_bytes", broken)
    monkeypatch.setattr(features_mod, "default_compute", lambda: "onnx")
    samples = scan_dataset(phantom_dir)[:2]
    split = _split()
    auto = FeatureStore(split, PRE, root=tmp_path / "a")
    got = auto.load(samples)
    ref = FeatureStore(split, PRE, root=tmp_path / "b", compute="fp32").load(samples)
    torch.testing.assert_close(got.features.float(), ref.features.float(), atol=0.02, rtol=0.02)
    assert auto.onnx_prefix is None and "unsupported operator" in caplog.text
    with pytest.raises(RuntimeError, match="unsupported operator"):  # asked for by name
        FeatureStore(split, PRE, root=tmp_path / "c", compute="onnx").load(samples)


def test_store_misses_when_preprocessing_or_weights_change(tmp_path: Path) -> None:
    split = _split()
    a = FeatureStore(split, PRE, root=tmp_path)
    b = FeatureStore(split, Preprocessor(image_size=64, image_width=96), root=tmp_path)
    with torch.no_grad():
        next(split.prefix.parameters()).add_(1.0)
    c = FeatureStore(split, PRE, root=tmp_path)
    assert len({a.folder, b.folder, c.folder}) == 3
    with pytest.raises(ValueError, match="views must start"):
        FeatureStore(split, PRE, views=("hflip",))


def test_default_recipe_path_trains_on_cached_features_and_its_checkpoint_agrees(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the default recipe (kidney band, frozen backbone, cached features, flip TTA)
    monkeypatch.setenv("KIDNEYSCAN_CACHE", str(tmp_path / "cache"))
    cfg = ExperimentConfig(
        model_kwargs=TINY,
        image_size=64,
        image_width=96,
        weights="none",
        train=TrainConfig(epochs=2, batch_size=8, early_stopping_patience=0),
    )
    # Execute
    res = train_central(phantom_dir, tmp_path / "run", cfg, progress=False, n_bootstrap=0)
    with (res.run_dir / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    samples = [s for s in scan_dataset(phantom_dir) if str(s.path) in {r["path"] for r in rows}]
    samples.sort(key=lambda s: [r["path"] for r in rows].index(str(s.path)))
    probs, _, meta = checkpoint_probs(res.checkpoint_dir, samples)
    # Assert: trained on the cache; the saved model (pixels in, with its own flip averaging)
    # reproduces the reported test probabilities computed from the cached views
    summary = (res.run_dir / "report.md").read_text()
    assert "feature cache" in summary and "orig+hflip" in summary
    assert meta["model"]["kwargs"]["flip_tta"] is True
    reported = np.array([[float(r[f"p_{c}"]) for c in meta["classes"]] for r in rows])
    np.testing.assert_allclose(probs, reported, atol=2e-3)
    assert meta["input_size"] == [3, 64, 96]
    # ...and the same checkpoint exports to ONNX (checked against torch on export) and serves,
    # reporting the kidney band it cropped
    from kidneyscan.export.onnx import export_checkpoint
    from kidneyscan.serve.predictor import Predictor

    assert export_checkpoint(res.checkpoint_dir).is_file()
    served = Predictor.from_checkpoint(res.checkpoint_dir)
    image = load_image(samples[0].path)
    _, _, roi = served.prepare(image)
    assert roi is not None and roi["source"] == "spine"
    got = served.predict([image])[0].probabilities
    np.testing.assert_allclose([got[c] for c in meta["classes"]], probs[0], atol=1e-5)
