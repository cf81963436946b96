"""ONNX export, int8 quantization guard and the ONNX Runtime backend in the service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _serve_support import encode, multipart

CLASSES = ["Cyst", "Normal", "Stone", "Tumor"]


def _hybrid_checkpoint(out: Path) -> Path:
    from kidneyscan.models.checkpoint import save_checkpoint
    from kidneyscan.models.factory import create_classifier
    from kidneyscan.preprocess.pipeline import Preprocessor

    torch.manual_seed(0)
    model = create_classifier(
        "hybrid", len(CLASSES), backbone="convnext_atto", image_size=64, embed_dim=64, depth=1,
        num_heads=4,
    )  # fmt: skip
    meta = {
        "classes": CLASSES,
        "preprocessing": Preprocessor(image_size=64).to_dict(),
        "temperature": 1.3,
    }
    return save_checkpoint(out, model, meta)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from kidneyscan.export.onnx import export_checkpoint

    ckpt = _hybrid_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint")
    return ckpt, export_checkpoint(ckpt)


def test_fp32_export_matches_torch_in_shape_class_order_and_top1(exported):
    # Prepare
    from kidneyscan.export.onnx import make_session, read_properties, read_sidecar
    from kidneyscan.models.checkpoint import load_checkpoint

    ckpt, onnx_path = exported
    model, meta = load_checkpoint(ckpt)
    x = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    # Execute
    got = make_session(onnx_path).run(["logits"], {"input": x.numpy()})[0]
    with torch.inference_mode():
        ref = model(x).numpy()
    props = read_properties(onnx_path)
    sidecar = read_sidecar(onnx_path.parent)
    # Assert: dynamic batch (exported with 2, run with 7), same logits and order
    assert got.shape == (7, len(CLASSES))
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert props["classes"] == CLASSES
    assert props["preprocessing"] == meta["preprocessing"]
    assert props["weights_sha256"] == meta["weights_sha256"]
    assert sidecar["classes"] == CLASSES and sidecar["temperature"] == 1.3
    assert sidecar["onnx"]["source_weights_sha256"] == meta["weights_sha256"]


def test_quality_report_refuses_low_agreement_and_f1_drop():
    # Prepare: 10 images, int8 flips the top-1 of one (90 % agreement) and that one was right
    from kidneyscan.export.quantize import quality_report

    ref = np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]] * 5.0
    q = ref.copy()
    q[0] = [0, 5, 0, 0]
    labels = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    # Execute
    bad = quality_report(ref, q, labels, num_classes=4, min_agreement=0.99)
    lenient = quality_report(ref, q, labels, num_classes=4, min_agreement=0.9, max_f1_drop=0.5)
    same = quality_report(ref, ref + 0.01, labels, num_classes=4)
    # Assert
    assert bad.agreement == pytest.approx(0.9) and not bad.passed
    assert any("agreement" in r for r in bad.reasons)
    assert any("macro-F1" in r for r in bad.reasons)
    assert bad.macro_f1_change is not None and bad.macro_f1_change < -0.02
    assert lenient.passed and lenient.reasons == []
    assert same.passed and same.agreement == 1.0 and same.macro_f1_change == 0.0
    with pytest.raises(ValueError, match="min_agreement"):
        quality_report(ref, q, labels, num_classes=4, min_agreement=1.5)


@pytest.mark.slow
def test_int8_passes_guard_then_refuses_when_forced(exported, phantom_dir, monkeypatch):
    """Breaks if the guard reports another agreement / macro-F1 change than fp32 torch vs the
    int8 graph give on the held-out images, if thresholds set at the measured values refuse
    (or, below 100 % agreement, one just above them passes), or if a forced broken graph
    (rolled logits) is kept. On this tiny model int8 agrees 100 % with fp32, so the
    measured thresholds are the strictest possible (agreement 1.0, no F1 drop)."""
    # Prepare
    from sklearn.metrics import f1_score

    import kidneyscan.export.quantize as qz
    from kidneyscan.export.backend import OnnxBackend
    from kidneyscan.export.onnx import make_session, read_properties, read_sidecar
    from kidneyscan.models.checkpoint import load_checkpoint

    ckpt, onnx_path = exported
    folder = onnx_path.parent
    # Execute: a genuine int8 quantization, calibrated on phantom images. A random tiny
    # network has nearly tied logits, so its int8 agreement is far from a trained model's;
    # the first run measures it, the next ones set the thresholds at and just above it.
    report = qz.quantize_checkpoint(
        ckpt, folder, phantom_dir, calibration_size=32, min_agreement=0.0, max_f1_drop=1.0
    )
    int8 = folder / "model.int8.onnx"
    backend = OnnxBackend(int8, CLASSES, precision="int8")
    logits = backend.logits(torch.zeros(3, 3, 64, 64))
    model, meta = load_checkpoint(ckpt)
    _, val = qz.calibration_and_validation(phantom_dir, meta["preprocessing"], calibration_size=32)
    ref_top = qz.torch_logits(model, val.inputs).argmax(1)
    q_top = qz.run_session(make_session(int8), val.inputs).argmax(1)
    f1 = {"labels": [0, 1, 2, 3], "average": "macro", "zero_division": 0}
    assert val.labels is not None
    want_change = f1_score(val.labels, q_top, **f1) - f1_score(val.labels, ref_top, **f1)
    # Assert: the report is what fp32 vs int8 give on the 16 held-out images
    assert report.passed and report.n_images == 48 - 32 == len(val.inputs)
    assert report.agreement == pytest.approx(float((ref_top == q_top).mean()), abs=1e-12)
    assert report.macro_f1_change == pytest.approx(want_change, abs=1e-12)
    assert logits.shape == (3, 4) and np.isfinite(logits).all()

    # Execute + Assert: thresholds exactly at the measured values pass, stricter ones refuse
    def quantize(min_agreement: float, max_f1_drop: float) -> qz.QualityReport:
        return qz.quantize_checkpoint(
            ckpt, folder, phantom_dir, calibration_size=32,
            min_agreement=min_agreement, max_f1_drop=max_f1_drop,
        )  # fmt: skip

    at = quantize(report.agreement, max(0.0, -want_change))
    assert at.passed and at.agreement == report.agreement
    if report.agreement < 1.0:
        with pytest.raises(qz.QuantizationRefused, match="agreement"):
            quantize(report.agreement + 1e-6, 1.0)
        quantize(0.0, 1.0)  # put the int8 graph back for the checks below
    assert read_properties(int8)["classes"] == CLASSES
    assert read_sidecar(folder)["onnx"]["int8"]["agreement"] == report.agreement

    # Execute: force a broken int8 graph (its logits are rolled by one class)
    real = qz.run_session
    monkeypatch.setattr(qz, "run_session", lambda s, x: np.roll(real(s, x), 1, axis=1))
    with pytest.raises(qz.QuantizationRefused, match="agreement") as info:
        qz.quantize_checkpoint(ckpt, folder, phantom_dir, calibration_size=32, max_f1_drop=1.0)
    # Assert: refused, no int8 graph left, the refusal recorded
    assert not info.value.report.passed and info.value.report.agreement < 0.99
    assert not int8.exists()
    side = read_sidecar(folder)["onnx"]
    assert "int8" not in side and side["int8_refused"]["passed"] is False
    assert json.loads((folder / "int8_quality.json").read_text())["passed"] is False


def test_onnx_backend_serves_the_same_probabilities_as_torch(exported):
    # Prepare
    from kidneyscan.serve import ServeConfig, create_app

    ckpt, _ = exported
    img = (np.random.default_rng(0).random((80, 80)) * 255).astype(np.uint8)
    bodies = {}
    # Execute
    for backend in ("torch", "onnx"):
        app = create_app(ServeConfig(checkpoint=ckpt, backend=backend, rate_limit=0))
        resp = app.test_client().post("/api/v1/predict", data=multipart(encode(img)))
        assert resp.status_code == 200, resp.get_data(as_text=True)
        bodies[backend] = resp.get_json()
    # Assert
    t, o = (bodies[b]["results"][0] for b in ("torch", "onnx"))
    assert bodies["onnx"]["model"]["backend"] == "onnx-fp32"
    assert list(o["probabilities"]) == CLASSES
    assert o["predicted_class"] == t["predicted_class"]
    for c in CLASSES:
        assert o["probabilities"][c] == pytest.approx(t["probabilities"][c], abs=1e-4)


def test_onnx_backend_rejects_stale_export_and_wrong_class_order(exported, tmp_path):
    # Prepare
    from kidneyscan.export.backend import OnnxBackend, make_onnx_backend
    from kidneyscan.export.onnx import ExportError
    from kidneyscan.models.checkpoint import load_checkpoint

    ckpt, onnx_path = exported
    model, meta = load_checkpoint(ckpt)
    # Execute / Assert
    with pytest.raises(ExportError, match="class order"):
        OnnxBackend(onnx_path, list(reversed(CLASSES)))
    with pytest.raises(ExportError, match="other weights"):
        make_onnx_backend(model, {**meta, "weights_sha256": "0" * 64}, ckpt, precision="fp32")
    with pytest.raises(ValueError, match="precision"):
        make_onnx_backend(model, meta, ckpt, precision="int4")


def test_onnx_backend_exports_in_memory_when_no_export_exists(tmp_path):
    # Prepare: a checkpoint never exported
    from kidneyscan.export.backend import make_onnx_backend
    from kidneyscan.models.checkpoint import load_checkpoint

    ckpt = _hybrid_checkpoint(tmp_path / "ck")
    model, meta = load_checkpoint(ckpt)
    x = torch.randn(2, 3, 64, 64)
    # Execute
    backend = make_onnx_backend(model, meta, ckpt, precision="auto")
    # Assert: works, and the checkpoint folder was not written to
    with torch.inference_mode():
        np.testing.assert_allclose(backend.logits(x), model(x).numpy(), atol=1e-4)
    assert backend.name == "onnx-fp32" and not (ckpt / "onnx").exists()


def test_cli_export_errors_are_clear(tmp_path, exported):
    # Prepare
    from typer.testing import CliRunner

    from kidneyscan.cli import app

    ckpt, _ = exported
    runner = CliRunner()
    # Execute
    no_cal = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--int8"])
    bad_fmt = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--format", "tflite"])
    no_ckpt = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "nope")])
    ok = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x")])
    # Assert
    assert no_cal.exit_code == 2 and "--calibration" in no_cal.output
    assert bad_fmt.exit_code == 2 and "tflite" in bad_fmt.output
    assert no_ckpt.exit_code == 2 and "not a checkpoint" in no_ckpt.output
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "x" / "model.onnx").is_file()


def test_int8_keeps_high_resolution_convs_float(tmp_path):
    """The early, high-resolution convolutions stay float and the later ones get int8 weights.

    Breaks if ``quantize_onnx`` stops passing :func:`high_resolution_convs` to ONNX Runtime
    (every Conv would read a DequantizeLinear weight) or if the stride rule counts the wrong
    axis (the stride-8 conv would stay float too).
    """
    import onnx

    from kidneyscan.export.onnx import export_bytes
    from kidneyscan.export.quantize import quantize_onnx

    # Prepare: three stride-2 convs (outputs at 1/2, 1/4, 1/8 of a 32 x 128 input; the wide
    # input makes every conv's output width >= a quarter of the input height, so reading the
    # wrong axis would keep all three float)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4),
    )  # fmt: skip
    meta = {"classes": CLASSES, "preprocessing": {"image_size": 32, "image_width": 128}}
    fp32 = tmp_path / "m.onnx"
    fp32.write_bytes(export_bytes(net, meta))
    cal = np.random.default_rng(0).random((6, 3, 32, 128)).astype(np.float32)

    def quantized_convs(path: Path) -> list[bool]:
        graph = onnx.load(str(path)).graph
        dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return [n.input[1] in dq_outputs for n in graph.node if n.op_type == "Conv"]

    # Execute: the default recipe (moving average, stride <= 4 float) and an all-int8 one
    default = quantize_onnx(fp32, tmp_path / "d.onnx", cal)
    everything = quantize_onnx(fp32, tmp_path / "a.onnx", cal, float_stride=0)

    # Assert: only the stride-8 conv is int8 by default; all three when nothing stays float
    assert quantized_convs(default) == [False, False, True]
    assert quantized_convs(everything) == [True, True, True]
