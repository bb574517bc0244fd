"""``bagel-rt app`` in a real headless browser (the system's Chromium, driven by Playwright) on the tiny model:
load the page, run a text-to-image request, see the progress and the image. The screenshot is kept in
``tests/artifacts/`` (git-ignored)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def app_url(tiny):
    proc = subprocess.Popen([sys.executable, "-m", "bagel_rt.cli.entry", "app", "--model", str(tiny), "--device",
                             "cpu", "--port", "0", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    url, log = None, []
    for line in proc.stderr:
        log.append(line)
        if m := re.search(r"serving .* on (http://\S+)", line):
            url = m[1]
            break
    assert url, f"the app did not start: {''.join(log)}"
    threading.Thread(target=lambda: [log.append(line) for line in proc.stderr], daemon=True).start()
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() - t0 < 60 and proc.poll() is None, "".join(log)
        time.sleep(0.1)
    yield url
    proc.terminate()
    assert proc.wait(60) == 0, "".join(log[-20:])


def _set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_text_to_image_in_a_browser(app_url):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url + "/", wait_until="load")
        page.wait_for_selector("#t2i-prompt textarea", timeout=60_000)
        for tab in ("Text to Image", "Edit", "Understanding", "Think"):
            assert page.get_by_role("tab", name=tab).count() == 1
        page.locator("#t2i-prompt textarea").fill("A red bagel on a white plate.")
        _set_number(page, "t2i-height", 48)
        _set_number(page, "t2i-width", 64)
        page.locator("#t2i-settings").get_by_text("Settings").click()
        _set_number(page, "t2i-steps", 100)
        page.locator("#t2i-run").click()
        # the progress shows while it works: "step i of n" (n = the denoising steps: 99 for 100 timesteps, the
        # last timestep, 0, is never evaluated; Bagel.generate's on_step)
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            page.wait_for_selector("text=/step [0-9]+ of [0-9]+/", timeout=60_000)
        except playwright.Error:
            page.screenshot(path=str(ARTIFACTS / "webapp_t2i_failed.png"), full_page=True)
            raise
        img = page.wait_for_selector("#t2i-image img", timeout=120_000)
        src = img.get_attribute("src")
        shown = page.evaluate("(el) => [el.naturalWidth, el.naturalHeight]", img)
        shot = ARTIFACTS / "webapp_t2i.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")
        data = page.request.get(src if src.startswith("http") else app_url + "/" + src.lstrip("/")).body()

        # understanding: the answer streams into its box
        page.get_by_role("tab", name="Understanding").click()
        page.locator("#und-question textarea").fill("Why is the sky blue?")
        page.locator("#und-run").click()
        page.wait_for_function("() => document.querySelector('#und-answer textarea').value.length > 5",
                               timeout=60_000)
        browser.close()
    assert shown == [64, 48]
    image = Image.open(io.BytesIO(data))
    colors = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
    assert image.size == (64, 48) and len(colors) > 10  # a picture, not a blank
