"""Tests of the EDA report (on the tiny phantom fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from kidneyscan.cli import app
from kidneyscan.data.datasets import CLASSES, DataError
from kidneyscan.data.eda import run_eda


def test_eda_writes_plots_montages_and_summary(phantom_dir: Path, tmp_path: Path) -> None:
    # Execute
    result = run_eda(phantom_dir, tmp_path, max_per_class=6, montage_size=4)
    # Assert
    s = result.summary
    assert s["n_images"] == 48 and s["n_measured"] == 24
    assert s["class_counts"] == {c: 12 for c in CLASSES}
    assert s["image_sizes"] == {"64x64": 24}
    for c in CLASSES:
        st = s["intensity"][c]
        assert st["n_measured"] == 6
        assert 0.0 < st["foreground_fraction"] < 1.0 and 0.0 < st["foreground_mean"] < 1.0
        with Image.open(tmp_path / f"montage_{c}.png") as im:
            assert im.size == (2 * 128, 2 * 128)
    for name in ("class_counts", "intensity_histograms", "image_stats", "site_class_mix"):
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.size[0] > 200
    assert set(s["site_class_mix"]) == {"site0", "site1", "site2"}
    assert sum(sum(m.values()) for m in s["site_class_mix"].values()) == 48
    md = (tmp_path / "eda_summary.md").read_text()
    assert "| Cyst | 12 |" in md and "site_class_mix.png" in md
    assert json.loads((tmp_path / "eda_summary.json").read_text())["n_images"] == 48


def test_eda_rejects_missing_folder_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        run_eda(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="montage_size"):
        run_eda(tmp_path, tmp_path / "out", montage_size=0)


def test_cli_eda(phantom_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(
        app,
        ["eda", str(phantom_dir), "--out", str(tmp_path), "--max-per-class", "2", "--no-progress"],
    )
    assert ok.exit_code == 0, ok.output
    assert "48 images" in ok.output and (tmp_path / "eda_summary.md").is_file()
    bad = runner.invoke(app, ["eda", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "not a directory" in bad.output


@pytest.mark.realdata
def test_eda_on_real_ct_kidney_sample(real_data: Path, tmp_path: Path) -> None:
    result = run_eda(real_data, tmp_path, max_per_class=3, montage_size=2)
    s = result.summary
    assert s["n_images"] == sum(s["class_counts"].values()) and s["n_measured"] == 12
    assert all(n > 0 for n in s["class_counts"].values())
    assert s["image_sizes"] == {"512x512": 12}
    assert s["site_class_mix"] == {}  # no phantom metadata in the real data
