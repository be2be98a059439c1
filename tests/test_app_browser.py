"""`copatch app` in a real browser: the command serves the page on a free loopback port (a subprocess),
headless Chromium (Debian's `chromium`, driven by Playwright) uploads a demo scene, types an
expression and presses Segment; the chosen mask downloaded from the page must equal the API's for the
same inputs and be the right object. Every request that leaves the machine is blocked and must not
happen (no CDN fonts or scripts). A bad input shows a message, not a traceback.

The page's screenshot goes to the test's tmp dir, and also to `$COPATCH_SCREENSHOT` when set
(`COPATCH_SCREENSHOT=docs/app.png python -m pytest -q tests/test_app_browser.py` renews README's).

Skipped, with the reason, when Playwright's Python package or a Chromium binary is missing
(`.ci/run` installs Debian's `chromium`; Playwright's own browser download is not used).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")
START_TIMEOUT = 90  # s for the app to import, load the model and serve
RESULT_TIMEOUT = 45_000  # ms for a result to appear in the page


def _chromium() -> str | None:
    found = os.environ.get("COPATCH_CHROMIUM")
    if found and Path(found).is_file():
        return found
    for path in CHROMIUM_CANDIDATES:
        if Path(path).is_file():
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


try:
    import playwright.sync_api  # noqa: F401
    HAS_PLAYWRIGHT = True
except ImportError:
    HAS_PLAYWRIGHT = False
try:
    import gradio  # noqa: F401
    HAS_GRADIO = True
except ImportError:
    HAS_GRADIO = False
CHROMIUM = _chromium()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_GRADIO, reason="gradio is not installed (pip install -e '.[app]')"),
    pytest.mark.skipif(not HAS_PLAYWRIGHT, reason="playwright's Python package is not installed "
                                                  "(pip install -e '.[test]')"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium, or set "
                                                "COPATCH_CHROMIUM=/path/to/chromium)"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_served(url: str, proc: subprocess.Popen, log: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"copatch app exited with {proc.returncode} before serving:\n{''.join(log)[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"copatch app did not serve {url} within {timeout} s:\n{''.join(log)[-3000:]}")


@pytest.fixture
def served_app(tmp_path):
    """`copatch app` on a free loopback port, in its own session; killed (the whole group) afterwards."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "TMPDIR": str(tmp_path)}
    code = "import sys; from copatch.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "app", "--port", str(port), "--host", "127.0.0.1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        yield f"http://127.0.0.1:{port}/", proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        reader.join(timeout=5)


def test_app_in_chromium_shows_the_api_mask_and_fetches_nothing(served_app, tmp_path):
    from playwright.sync_api import sync_playwright

    from copatch.app import demo_scenes
    from copatch.module import CoPatch

    url, proc, log = served_app
    scene = demo_scenes()[0]  # two expressions about it, with the masks of the objects they name
    texts = scene.expressions
    scene_file = tmp_path / "demo-scene.png"
    Image.fromarray(scene.image).save(scene_file)
    # The API's mask for the same inputs (the same PNG file), while the app starts.
    expected = [p.mask.numpy() for p in CoPatch.from_preset("demo").segment(Image.open(scene_file), texts)]
    _wait_until_served(url, proc, log, START_TIMEOUT)

    outside: list[str] = []

    def only_loopback(route):
        address = route.request.url
        if address.startswith(("http://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            outside.append(address)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(RESULT_TIMEOUT)
            page.route("**/*", only_loopback)
            page.goto(url, wait_until="networkidle")
            # A bad input first: no expression -> a message in the page, no traceback.
            page.locator("#copatch-image input[type=file]").set_input_files(str(scene_file))
            page.locator("#copatch-run").click()
            status = page.locator("#copatch-status")
            status.get_by_text("Cannot segment").wait_for()
            assert "type an expression" in status.inner_text() and "Traceback" not in page.content()
            # Then the real request.
            page.locator("#copatch-text textarea").fill("\n".join(texts))
            page.locator("#copatch-run").click()
            status.get_by_text(f"{len(texts)} expressions on a 128x128 image").wait_for()
            for picture in ("mask", "candidates-picture", "clusters", "similarity"):
                image = page.locator(f"#copatch-{picture} img").first
                image.wait_for(state="visible")
                assert image.evaluate("e => e.complete && e.naturalWidth") >= 256
            links = page.locator("#copatch-masks a[download]")
            links.first.wait_for()
            assert links.count() == len(texts)
            downloads = []
            for i in range(len(texts)):
                assert links.nth(i).get_attribute("download").startswith(f"mask-{i + 1}-")
                reply = page.request.get(links.nth(i).get_attribute("href"))
                assert reply.ok, reply.status
                downloads.append(np.asarray(Image.open(io.BytesIO(reply.body()))))
            page.get_by_text("the star", exact=True).first.wait_for()  # the parse table's noun phrase
            time.sleep(0.5)  # let the images settle before the picture is taken
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    for text, got, want, truth in zip(texts, downloads, expected, scene.truth):
        assert got.shape == want.shape and set(np.unique(got)) <= {0, 255}
        assert np.array_equal(got == 255, want), f"the page's mask of {text!r} differs from CoPatch.segment's"
        assert (want & truth).sum() / (want | truth).sum() > 0.9, f"{text!r}: not the object it names"
    assert outside == [], f"the page tried to reach outside the machine: {outside}"
    assert "Traceback" not in "".join(log)
    target = os.environ.get("COPATCH_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
