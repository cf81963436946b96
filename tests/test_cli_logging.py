"""The batch commands' console shows a per-slice fallback warning once and counts the rest."""

from __future__ import annotations

import io
import logging

import numpy as np

from kidneyscan.cli._logging import RepeatSummary, setup_console_logging
from kidneyscan.preprocess.anatomy import mask_outside_kidneys


def _logger(filt: RepeatSummary) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(filt)
    log = logging.getLogger("kidneyscan.test_repeats")
    log.handlers = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log, out


def test_repeats_are_shown_once_and_counted() -> None:
    filt = RepeatSummary()
    log, out = _logger(filt)
    for _ in range(5):
        log.warning("kidney band: no vertebra found")
    log.info("split %s: %d images", "train", 600)
    log.info("split %s: %d images", "test", 200)  # same template, another line: shown
    for _ in range(2):
        log.error("cannot read slice")  # errors are never held back
    lines = out.getvalue().splitlines()
    assert lines.count("kidney band: no vertebra found") == 1
    assert "split train: 600 images" in lines and "split test: 200 images" in lines
    assert lines.count("cannot read slice") == 2
    assert filt.summary() == [
        "WARNING kidney band: no vertebra found (5 times in all; shown once above)"
    ]
    report = io.StringIO()
    filt.report(report)
    assert "5 times in all" in report.getvalue()
    assert filt.summary() == []  # counting starts anew


def test_setup_counts_the_kidney_mask_fallback() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        filt = setup_console_logging(logging.WARNING)
        blank = np.zeros((64, 64), np.float32)
        for _ in range(3):
            np.testing.assert_array_equal(mask_outside_kidneys(blank), blank)
        (line,) = filt.summary()
        assert "no kidney found" in line and "3 times in all" in line
    finally:
        root.handlers, root.level = saved[0], saved[1]
        filt.counts.clear()


def test_a_command_prints_the_counts_when_it_ends_and_lets_later_lines_through() -> None:
    import click
    from click.testing import CliRunner

    root = logging.getLogger()
    saved = root.handlers[:], root.level

    @click.command()
    def scan() -> None:
        setup_console_logging(logging.WARNING)
        for _ in range(3):
            logging.getLogger("kidneyscan.preprocess.roi").warning("kidney band: no vertebra")

    try:
        res = CliRunner().invoke(scan)
        assert res.exit_code == 0, res.output
        assert res.output.count("kidney band: no vertebra") == 2  # the line, then its count
        assert "WARNING kidney band: no vertebra (3 times in all; shown once above)" in res.output
        # after the command, the console handler holds nothing back any more
        assert all(not h.filters for h in logging.getLogger().handlers)
    finally:
        root.handlers, root.level = saved[0], saved[1]
