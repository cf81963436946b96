"""``kidneyscan serve`` command: help text and the no-checkpoint message."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kidneyscan.cli import app

runner = CliRunner()


def test_serve_help_lists_options():
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--checkpoint", "--host", "--port", "--workers", "--backend"):
        assert option in result.output


def test_serve_without_any_checkpoint_says_how_to_make_one(tmp_path: Path, monkeypatch):
    # Prepare: a working directory without runs/demo/checkpoint.
    monkeypatch.chdir(tmp_path)
    # Execute
    result = runner.invoke(app, ["serve"])
    # Assert
    assert result.exit_code != 0
    assert "make demo" in result.output
    assert "runs/demo/checkpoint" in result.output


@pytest.mark.parametrize("args", [["--checkpoint", "nowhere"], ["--port", "0"]])
def test_serve_rejects_bad_arguments(tmp_path: Path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code != 0
