"""Real browser: start ``kidneyscan serve``, upload with Debian chromium via Playwright."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from _serve_support import CLASSES, ct_like, encode, make_checkpoint

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


@pytest.fixture
def sample_image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A phantom CT slice when the phantom generator exists, else a synthetic PNG."""
    if importlib.util.find_spec("kidneyscan.data.phantom") is not None:
        root: Path = request.getfixturevalue("phantom_dir")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
        if files:
            return files[0]
    path = tmp_path / "slice.png"
    path.write_bytes(encode(ct_like(64)))
    return path


@pytest.fixture
def server(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
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


def test_upload_in_chromium_shows_prediction_and_heatmap(server, sample_image, tmp_path):
    from playwright.sync_api import sync_playwright

    # Prepare
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image at all")
    shot = tmp_path / "web_ui.png"
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
            # Execute
            page.goto(server + "/")
            assert "Research use only" in page.locator("#disclaimer").inner_text()
            page.set_input_files("#file-input", [str(sample_image), str(bad)])
            page.wait_for_selector(".card.done", timeout=120_000)
            page.wait_for_selector(".card.failed", timeout=60_000)
            card = page.locator(".card.done").first
            predicted = card.locator("[data-testid=predicted-class]").inner_text()
            heat = card.locator("[data-testid=heatmap]")
            heat_src = heat.get_attribute("src") or ""
            heat_width = heat.evaluate("img => img.naturalWidth")
            bars = card.locator(".bar-row").count()
            band = card.locator(".band").inner_text()
            card.locator(".opacity").fill("20")
            opacity = heat.evaluate("img => img.style.opacity")
            failed = page.locator(".card.failed .error").inner_text()
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("KIDNEYSCAN_SCREENSHOT"):
                shutil.copy(shot, os.environ["KIDNEYSCAN_SCREENSHOT"])
        finally:
            browser.close()
    # Assert
    assert predicted in CLASSES
    assert heat_src.startswith("data:image/png;base64,") and heat_width == 64
    assert bars == len(CLASSES)
    assert band.lower() in ("high", "good", "moderate", "low")
    assert opacity == "0.2"
    assert "415" in failed and "not a PNG, JPEG or DICOM" in failed
    assert shot.stat().st_size > 10_000
    assert errors == []
