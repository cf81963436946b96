"""CLI: ``kidneyscan preprocess show`` and a tiny ``preprocess bench`` via Typer's runner."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from kidneyscan.cli import app
from preprocess_synth import synth_slice


@pytest.fixture
def png(tmp_path: Path) -> Path:
    img, _ = synth_slice(96, lesion="cyst", seed=1)
    path = tmp_path / "slice.png"
    cv2.imwrite(str(path), (img * 255).astype(np.uint8))
    return path


def test_show_writes_panel(png: Path, tmp_path: Path) -> None:
    out = tmp_path / "panel.png"
    steps = json.dumps([{"name": "median", "size": 3}, {"name": "clahe"}])
    result = CliRunner().invoke(
        app, ["preprocess", "show", str(png), "--steps", steps, "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    panel = cv2.imread(str(out))
    assert panel is not None and panel.shape[1] > 3 * panel.shape[0]  # 4 panels side by side


@pytest.mark.parametrize(
    ("steps", "message"),
    [("[{name: 1}", "not valid JSON"), ('{"name": "clahe"}', "JSON list"),
     ('[{"name": "nope"}]', "unknown pipeline step")],
)  # fmt: skip
def test_show_rejects_bad_steps(png: Path, tmp_path: Path, steps: str, message: str) -> None:
    result = CliRunner().invoke(
        app, ["preprocess", "show", str(png), "--steps", steps, "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code != 0
    assert message in result.output


def test_show_missing_file_is_clear(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["preprocess", "show", str(tmp_path / "none.png"), "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2
    assert "none.png" in result.output


@pytest.mark.slow
def test_bench_tiny_writes_tables_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        ["preprocess", "bench", "--n", "2", "--image-size", "48", "--n-restore", "1",
         "--sites", "1", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert set(data["restoration"]) == {
        "gaussian", "salt_pepper", "poisson", "exponential", "erlang", "rayleigh", "uniform",
        "periodic",
    }  # fmt: skip
    assert "**" in (out / "restoration.md").read_text()  # a best filter is bold
    for name in ("enhancement.md", "segmentation.md", "bench.md", "comparison.png"):
        assert (out / name).stat().st_size > 100
