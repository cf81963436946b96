"""Distillation: soft targets, the student following its teacher, the CLI (tiny data, 64 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine_helpers import write_easy_dataset
from kidneyscan.cli import app
from kidneyscan.config import ExperimentConfig, TrainConfig
from kidneyscan.distill import SoftTargetDataset, distill, soft_targets
from kidneyscan.experiment import train_central
from kidneyscan.models.checkpoint import load_checkpoint, read_metadata, save_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_easy_dataset(tmp_path_factory.mktemp("distill_data"), per_class=16)


@pytest.fixture(scope="module")
def teacher_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ExperimentConfig(
        model="small_cnn",
        image_size=64,
        steps=[],
        train=TrainConfig(
            epochs=12, batch_size=8, lr=3e-3, cache_images=True, early_stopping_patience=0
        ),
    )
    res = train_central(
        data_dir, tmp_path_factory.mktemp("teacher"), cfg, progress=False, n_bootstrap=0
    )
    return res.checkpoint_dir


@pytest.fixture(scope="module")
def permuted_teacher(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The teacher with its head rows rolled: it calls class c what the teacher calls c - 1."""
    model, _ = load_checkpoint(teacher_dir)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(head.weight.roll(1, dims=0))
        head.bias.copy_(head.bias.roll(1, dims=0))
    meta = read_metadata(teacher_dir)
    return save_checkpoint(tmp_path_factory.mktemp("permuted") / "checkpoint", model, meta)


def test_soft_targets_mix_teacher_and_labels() -> None:
    # Prepare
    teacher = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]], dtype=np.float32)
    labels = np.array([0, 1])
    # Execute
    out = soft_targets(teacher, labels, alpha=0.6)
    # Assert: alpha * teacher + (1 - alpha) * one-hot, by hand.
    np.testing.assert_allclose(out, [[0.7, 0.3, 0.0], [0.06, 0.52, 0.42]], atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        soft_targets(teacher, labels, alpha=1.5)


def test_soft_target_dataset_checks_rows(data_dir: Path) -> None:
    from kidneyscan.data.datasets import scan_dataset
    from kidneyscan.data.loaders import ImageDataset
    from kidneyscan.preprocess.pipeline import Preprocessor

    base = ImageDataset(scan_dataset(data_dir)[:3], Preprocessor(image_size=64))
    with pytest.raises(ValueError, match="probability distribution"):
        SoftTargetDataset(base, np.full((3, 4), 0.5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        SoftTargetDataset(base, np.full((2, 4), 0.25, dtype=np.float32))
    ds = SoftTargetDataset(base, np.full((3, 4), 0.25, dtype=np.float32))
    x, y = ds[1]
    assert x.shape[-2:] == (64, 64) and y.tolist() == [0.25] * 4
    assert ds.labels.tolist() == base.labels.tolist()


@pytest.mark.slow
def test_student_learns_the_teachers_labels_not_the_files(
    data_dir: Path, permuted_teacher: Path, tmp_path: Path
) -> None:
    """With alpha = 1 the student's only signal is the teacher. Taught by a teacher whose
    classes are rolled by one, the student fits the teacher's labels of its training images
    (train accuracy counts the target's most probable class) and is wrong on the validation
    files' true labels; training on the file labels (targets ignored or misaligned) would
    make it right on them. The last epoch is checked: model selection on true-label
    validation F1 would otherwise pick whichever epoch copied the teacher least."""
    # Execute
    res = distill(
        permuted_teacher,
        data_dir,
        tmp_path / "student",
        student="small_cnn",
        train=TrainConfig(
            epochs=10,
            batch_size=8,
            lr=3e-3,
            cache_images=True,
            augment=False,
            early_stopping_patience=0,
        ),
        alpha=1.0,
        progress=False,
        n_bootstrap=0,
    )
    # Assert: the permuted teacher is wrong on the files; the student copies it.
    history = json.loads((res.run_dir / "history.json").read_text())
    assert res.teacher_metrics["accuracy"] < 0.3
    assert history[-1]["train_accuracy"] >= 0.6
    assert history[-1]["val_accuracy"] < 0.4


@pytest.mark.slow
def test_cli_distill_writes_a_servable_run(
    data_dir: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    # Execute
    out = tmp_path / "student"
    res = runner.invoke(
        app,
        [
            "distill",
            "--teacher",
            str(teacher_dir),
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--student",
            "small_cnn",
            "--epochs",
            "4",
            "--lr",
            "3e-3",
            "--batch-size",
            "8",
            "--bootstrap",
            "0",
            "--no-progress",
        ],
    )
    # Assert
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "top-1 agreement" in res.output
    summary = json.loads((out / "distill.json").read_text())
    assert summary["student"] == "small_cnn"
    assert 0.0 <= summary["top-1 agreement with the teacher"] <= 1.0
    model, meta = load_checkpoint(out / "checkpoint")
    assert meta["distilled_from"]["weights_sha256"] == read_metadata(teacher_dir)["weights_sha256"]
    # The student's preprocessing is the teacher's (steps and size).
    t_pre = read_metadata(teacher_dir)["preprocessing"]
    assert meta["preprocessing"]["steps"] == t_pre["steps"]
    assert meta["input_size"][1:] == [64, 64]
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)


def test_cli_distill_without_split_file_is_a_clear_error(
    data_dir: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a teacher whose split file has gone.
    model, meta = load_checkpoint(teacher_dir)
    meta["split_file"] = str(tmp_path / "gone.csv")
    ckpt = save_checkpoint(tmp_path / "teacher", model, meta)
    # Execute
    res = runner.invoke(
        app, ["distill", "--teacher", str(ckpt), "--data", str(data_dir), "--out", str(tmp_path)]
    )
    # Assert
    assert res.exit_code == 2
    assert "split file" in res.output and "gone.csv" in res.output
