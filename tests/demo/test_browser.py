"""The demo page in a real headless Chromium: it renders its controls, and a screenshot is saved."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1280, 900)


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def headless(browser: str, url: str, profile, *action: str) -> subprocess.CompletedProcess:
    """One headless run without network side trips; the virtual-time budget lets the page's scripts finish."""
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=20000",
         *action, url],
        capture_output=True, text=True, timeout=180, check=True,
    )


@pytest.fixture(scope="module")
def browser():
    path = find_browser()
    if path is None:
        pytest.skip(f"no Chromium-family browser installed (looked for {', '.join(BROWSERS)})")
    return path


def test_page_renders_controls_and_panels(browser, served_demo, tmp_path):
    dom = headless(browser, served_demo[1], tmp_path / "profile", "--dump-dom").stdout
    for text in ("Qwen3-VL inside a fixed KV-cache budget", "New conversation", "Send", "Memory size M",
                 "Policy (global = DBTrimKV", "Send a question to see what the cache keeps.",
                 "Entries kept per layer x KV head", "Video (at most 5 s)"):
        assert text in dom, text


def test_screenshot(browser, served_demo, tmp_path):
    shot = tmp_path / "demo.png"
    headless(browser, served_demo[1], tmp_path / "profile", f"--screenshot={shot}")
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # text, borders, the primary button
    print(f"screenshot: {shot}")
