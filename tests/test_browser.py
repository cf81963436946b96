"""Real browser: start ``kidneyscan serve``, upload with Debian chromium via Playwright."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from _serve_support import CLASSES, KIDNEY_BAND, encode, make_checkpoint, no_spine, phantom_hu

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing (apt install chromium)"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="playwright not installed"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"server not ready after {timeout} s:\n{log.read_text()}")


def _screenshot_inputs() -> tuple[Path | None, list[Path]]:
    """Checkpoint and slices for the README screenshot, when asked for through the environment.

    ``KIDNEYSCAN_SCREENSHOT_CHECKPOINT`` (a trained checkpoint) and ``KIDNEYSCAN_SCREENSHOT_IMAGES``
    (slices, ``os.pathsep``-separated, e.g. real CT-KIDNEY files that must not be copied into the
    repository); by default the test makes its own tiny checkpoint and phantom slices.
    """
    ckpt = os.environ.get("KIDNEYSCAN_SCREENSHOT_CHECKPOINT")
    images = os.environ.get("KIDNEYSCAN_SCREENSHOT_IMAGES")
    return (
        Path(ckpt) if ckpt else None,
        [Path(p) for p in images.split(os.pathsep)] if images else [],
    )


@pytest.fixture
def sample_images(tmp_path: Path) -> list[Path]:
    """A phantom slice with a spine, a body without one, and a file that is no image at all."""
    from kidneyscan.data.phantom import window

    chosen = _screenshot_inputs()[1]
    if not chosen:
        chosen = [tmp_path / "phantom_slice.png", tmp_path / "no_spine.png"]
        chosen[0].write_bytes(encode((window(phantom_hu(256, 1)) * 255 + 0.5).astype(np.uint8)))
        chosen[1].write_bytes(encode(no_spine(128)))
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image at all")
    return [*chosen, bad]


@pytest.fixture
def server(tmp_path: Path):
    ckpt = _screenshot_inputs()[0] or make_checkpoint(
        tmp_path / "ckpt", steps=KIDNEY_BAND, image_size=64, image_width=96
    )
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.pop("KIDNEYSCAN_API_TOKEN", None)
    log = tmp_path / "server.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kidneyscan", "serve", "--checkpoint", str(ckpt)]
            + ["--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


#: Colour of the kidney-band box on the canvas (app.js): spine found.
BOX_GREEN = (0, 230, 118)


def test_upload_in_chromium_shows_box_overlay_and_batch_list(server, sample_images, tmp_path):
    from playwright.sync_api import sync_playwright

    # Prepare
    shot = tmp_path / "web_ui.png"
    n_files = len(sample_images)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # Execute: all files in one go (one batch request).
            page.goto(server + "/")
            assert "Research use only" in page.locator("#disclaimer").inner_text()
            page.set_input_files("#file-input", [str(p) for p in sample_images])
            # Polled from Python: wait_for_function evaluates strings, which the page's CSP
            # (no 'unsafe-eval') rightly refuses.
            _wait_until(lambda: page.locator(".card.done, .card.failed").count() == n_files, 180)
            _wait_until(
                lambda: (
                    page.locator(".card.done canvas.slice[data-box]").count()
                    == page.locator(".card.done").count()
                ),
                30,
            )
            card = page.locator(".card.done").first
            predicted = card.locator("[data-testid=predicted-class]").inner_text()
            canvas = card.locator("[data-testid=slice]")
            box = canvas.evaluate(
                """c => {
                    const [x, y, w, h] = c.dataset.box.split(",").map(Number);
                    const ctx = c.getContext("2d");
                    const lw = Math.max(2, Math.round(c.width / 160));
                    const edge = ctx.getImageData(x + (lw >> 1), y + (h >> 1), 1, 1).data;
                    return {x, y, w, h, width: c.width, source: c.dataset.source,
                            edge: [edge[0], edge[1], edge[2]]};
                }"""
            )
            heat = card.locator("[data-testid=heatmap]")
            heat_src = heat.get_attribute("src") or ""
            heat_size = heat.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            base_size = card.locator(".base").evaluate(
                "img => [img.naturalWidth, img.naturalHeight]"
            )
            heat_box = heat.bounding_box()
            base_box = card.locator(".base").bounding_box()
            bars = card.locator(".bar-row").count()
            band = card.locator(".band").inner_text()
            card.locator(".opacity").fill("20")
            opacity = heat.evaluate("img => img.style.opacity")
            card.locator(".opacity").fill("55")
            rows = page.locator(".batch-list li")
            row_classes = [rows.nth(i).get_attribute("class") for i in range(rows.count())]
            failed = page.locator(".card.failed .error").inner_text()
            notes = [
                n.inner_text()
                for n in page.locator("[data-testid=roi-note]").all()
                if n.is_visible()
            ]
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("KIDNEYSCAN_SCREENSHOT"):
                _save_small(shot, Path(os.environ["KIDNEYSCAN_SCREENSHOT"]))
        finally:
            browser.close()
    # Assert: the box is drawn on the slice, inside it and smaller than it, in green.
    assert predicted in CLASSES
    assert box["source"] == "spine"
    assert box["x"] >= 0 and box["x"] + box["w"] <= box["width"] and 0 < box["w"] < box["width"]
    assert all(abs(a - b) <= 40 for a, b in zip(box["edge"], BOX_GREEN, strict=True))
    # The overlay: the crop's heatmap laid exactly over the crop, both at the model input size.
    assert heat_src.startswith("data:image/png;base64,")
    assert heat_size == base_size and heat_size[0] > heat_size[1]  # the 3:2 kidney band
    assert heat_box == base_box and heat_box is not None and heat_box["width"] > 100
    assert bars == len(CLASSES)
    assert band.lower() in ("high", "good", "moderate", "low")
    assert opacity == "0.2"
    # The batch: one row per file, the bad one failed alone with its reason.
    assert len(row_classes) == n_files and row_classes[-1] == "failed"
    assert all(c and c.startswith("ok") for c in row_classes[:-1])
    assert "415" in failed and "not a PNG, JPEG or DICOM" in failed
    if not _screenshot_inputs()[1]:
        assert len(notes) == 1 and "Spine not found" in notes[0]  # the no-spine body
    assert shot.stat().st_size > 10_000
    assert errors == []


def _wait_until(check, timeout: float) -> None:
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.25)


def _save_small(src: Path, dst: Path) -> None:
    """Save the screenshot as a 256-colour PNG: a third of the size, no visible loss here."""
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            dst, optimize=True
        )
