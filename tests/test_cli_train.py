"""CLI train / evaluate / ensemble / compare / demo on tiny data (64 px, convnext_atto)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engine_helpers import write_easy_dataset
from kidneyscan.cli import app
from kidneyscan.data.loaders import make_loader
from kidneyscan.engine import predict
from kidneyscan.evaluation.calibration import nll
from kidneyscan.experiment import split_samples
from kidneyscan.models.checkpoint import load_checkpoint
from kidneyscan.preprocess.pipeline import Preprocessor

runner = CliRunner()

TINY_HYBRID = [
    "--model",
    "hybrid",
    "--model-kwarg",
    "backbone=convnext_atto",
    "--model-kwarg",
    "embed_dim=64",
    "--model-kwarg",
    "depth=1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_easy_dataset(tmp_path_factory.mktemp("cli_data"), per_class=14)


@pytest.fixture(scope="module")
def hybrid_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "hybrid"
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            *TINY_HYBRID,
            "--image-size",
            "64",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--bootstrap",
            "50",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out


@pytest.mark.slow
def test_train_writes_run_folder(hybrid_run: Path, data_dir: Path) -> None:
    """Breaks if a promised file is missing, or if the stored temperature is not the one that
    minimises the validation NLL of the saved model (fitted on other data, or not at all)."""
    # Assert: everything the docs promise is there.
    for name in (
        "config.yaml",
        "split.csv",
        "metrics.json",
        "val_metrics.json",
        "report.md",
        "confusion_matrix.png",
        "roc.png",
        "reliability.png",
        "training_curves.png",
        "history.json",
        "training.json",
    ):
        assert (hybrid_run / name).is_file(), name
    meta = json.loads((hybrid_run / "checkpoint" / "metadata.json").read_text())
    assert meta["model"]["name"] == "hybrid"
    assert meta["model"]["kwargs"]["backbone"] == "convnext_atto"
    assert meta["classes"] == ["Cyst", "Normal", "Stone", "Tumor"]
    assert meta["preprocessing"]["image_size"] == 64
    assert meta["input_size"] == [3, 64, 96]  # the kidney band (default first step) is 3:2
    # The temperature minimises validation NLL: recompute the saved model's val logits.
    model, _ = load_checkpoint(hybrid_run / "checkpoint")
    parts, _ = split_samples(data_dir, "multiclass", meta["split_file"])
    pre = Preprocessor.from_dict(meta["preprocessing"])
    loader = make_loader(parts["val"], pre, train=False, batch_size=32)
    val_logits, val_labels = predict(model, loader)
    t = float(meta["temperature"])
    assert nll(val_logits, val_labels, t) <= min(
        nll(val_logits, val_labels, t * 0.8), nll(val_logits, val_labels, t * 1.25)
    )
    assert meta["task"] == "multiclass"
    assert Path(meta["split_file"]).is_file()
    assert len(meta["weights_sha256"]) == 64
    assert meta["training"]["config"]["train"]["epochs"] == 2
    m = json.loads((hybrid_run / "metrics.json").read_text())
    assert m["evaluated_split"] == "test" and m["n"] > 0
    assert "stone_vs_rest" in m and "ci95" in m


@pytest.mark.slow
def test_evaluate_reproduces_training_metrics(
    hybrid_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    # Execute: evaluate the checkpoint on the run's own test split.
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(hybrid_run / "checkpoint"),
            "--data",
            str(data_dir),
            "--split",
            str(hybrid_run / "split.csv"),
            "--out",
            str(tmp_path / "ev"),
            "--bootstrap",
            "50",
        ],
    )
    # Assert: identical predictions -> identical metrics (round trip of weights + preprocessing).
    assert res.exit_code == 0, res.output + repr(res.exception)
    trained = json.loads((hybrid_run / "metrics.json").read_text())
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["n"] == trained["n"]
    assert again["confusion_matrix"] == trained["confusion_matrix"]
    assert again["nll"] == pytest.approx(trained["nll"], abs=1e-5)
    assert "macro-F1" in res.output


@pytest.mark.slow
def test_train_from_config_stone_vs_normal_and_compare(
    data_dir: Path, hybrid_run: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model: convnext_atto\nimage_size: 64\ntask: stone-vs-normal\n"
        "train:\n  epochs: 1\n  batch_size: 16\n  class_weighting: sampler\n"
    )
    out = tmp_path / "binary"
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--split",
            str(hybrid_run / "split.csv"),
            "--bootstrap",
            "20",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    meta = json.loads((out / "checkpoint" / "metadata.json").read_text())
    assert meta["classes"] == ["Normal", "Stone"] and meta["task"] == "stone-vs-normal"
    assert meta["training"]["config"]["train"]["class_weighting"] == "sampler"
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["Normal", "Stone"]
    # The binary run used only Normal/Stone images of the same split's test part.
    split_rows = (hybrid_run / "split.csv").read_text().splitlines()[1:]
    n_test = sum(
        1 for r in split_rows if r.endswith(",test") and (",Normal," in r or ",Stone," in r)
    )
    assert m["n"] == n_test

    res = runner.invoke(
        app, ["compare", str(hybrid_run), str(out), "--out", str(tmp_path / "cmp.md")]
    )
    assert res.exit_code == 0, res.output
    table = (tmp_path / "cmp.md").read_text().strip().splitlines()
    assert len(table) == 4
    assert "| hybrid | hybrid | multiclass |" in table[2]
    assert "| binary | convnext_atto | stone-vs-normal |" in table[3]


@pytest.mark.slow
def test_ensemble_of_two_checkpoints(data_dir: Path, hybrid_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "cnn"
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(data_dir),
            "--out",
            str(other),
            "--model",
            "convnext_atto",
            "--image-size",
            "64",
            "--epochs",
            "1",
            "--split",
            str(hybrid_run / "split.csv"),
            "--bootstrap",
            "0",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(
        app,
        [
            "ensemble",
            "--checkpoint",
            str(hybrid_run / "checkpoint"),
            "--checkpoint",
            str(other / "checkpoint"),
            "--data",
            str(data_dir),
            "--split",
            str(hybrid_run / "split.csv"),
            "--weighted-by-f1",
            "--out",
            str(tmp_path / "ens"),
            "--bootstrap",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    w = np.array(m["ensemble"]["weights"])
    f1s = [
        json.loads((d / "checkpoint" / "metadata.json").read_text())["metrics"]["val"]["macro_f1"]
        for d in (hybrid_run, other)
    ]
    assert w.sum() == pytest.approx(1.0)
    assert w == pytest.approx(np.array(f1s) / np.sum(f1s))
    assert len(m["ensemble"]["member_macro_f1"]) == 2
    # Each member alone, evaluated the same way, gives the macro-F1 the ensemble reports.
    solo = json.loads((hybrid_run / "metrics.json").read_text())
    assert m["ensemble"]["member_macro_f1"][0] == pytest.approx(solo["macro"]["f1"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--data", "{data}", "--out", "{tmp}/x", "--task", "stones"], "task"),
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/x"], "missing"),
        (["train", "--data", "{data}", "--out", "{tmp}/x", "--model-kwarg", "depth"], "KEY=VALUE"),
        (["evaluate", "--checkpoint", "{tmp}", "--data", "{data}"], "metadata.json"),
        (["ensemble", "--checkpoint", "{tmp}", "--data", "{data}"], "at least two"),
        (["compare", "{tmp}"], "metrics.json"),
    ],
)
def test_cli_errors_are_clear(data_dir: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    argv = [a.format(data=data_dir, tmp=tmp_path) for a in args]
    res = runner.invoke(app, argv)
    assert res.exit_code != 0
    assert needle in res.output + str(res.stderr if res.stderr_bytes else "")


def test_help_texts() -> None:
    for cmd in ("train", "evaluate", "ensemble", "compare", "demo"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output


def test_demo_hands_its_model_options_to_the_federated_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kidneyscan.federated import simulation

    seen: dict = {}

    def fake_demo(out: Path, **kwargs: object) -> dict:
        seen.update(kwargs)
        raise RuntimeError("stop before the simulation")

    monkeypatch.setattr(simulation, "demo_federated", fake_demo)
    args = ["demo", "--out", str(tmp_path / "d"), "--model-kwarg", "token_drop=0.75"]
    res = runner.invoke(app, [*args, "--model-kwarg", "token_pool=1"])
    assert seen["model_kwargs"] == {"token_drop": 0.75, "token_pool": 1}
    assert "stop before the simulation" in repr(res.exception)
    # The central demo has no such options: refused, not ignored.
    res = runner.invoke(app, [*args, "--central"])
    assert res.exit_code != 0 and "--model-kwarg applies to the federated demo" in res.output


@pytest.mark.slow
def test_central_demo_runs_end_to_end_on_a_tiny_phantom(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--central", "--out", str(out), "--n", "56"]
    args += ["--rounds", "1", "--local-epochs", "1", "--threads", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    meta = json.loads((out / "checkpoint" / "metadata.json").read_text())
    assert meta["model"]["name"] == "hybrid"
    assert (out / "report.md").is_file() and (out / "data" / "kidneyData.csv").is_file()
    assert "macro-F1" in res.output
    # A second demo run reuses the generated phantom.
    stamp = (out / "data" / ".demo.json").stat().st_mtime
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and (out / "data" / ".demo.json").stat().st_mtime == stamp


@pytest.mark.slow
def test_evaluate_all_images_without_split(hybrid_run: Path, data_dir: Path) -> None:
    res = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(hybrid_run / "checkpoint"),
            "--data",
            str(data_dir),
            "--bootstrap",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "on all (56 images)" in res.output.replace("\n", " ")
    bad = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(hybrid_run / "checkpoint"),
            "--data",
            str(data_dir),
            "--split",
            str(hybrid_run / "split.csv"),
            "--subset",
            "holdout",
        ],
    )
    assert bad.exit_code != 0 and "subset" in bad.output
