"""The Gradio demo, launched on localhost: driven through gradio_client, and in a real headless browser."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlseg

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
pytest.importorskip("gradio")
pytest.importorskip("gradio_client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    torch.manual_seed(3)
    m = vlseg.create_model("tiny-test", pretrained=False)
    with torch.no_grad():
        m.decoder.presence_head[1].bias.fill_(10.0)  # always "present"
    ck = m.save_pretrained(tmp / "ck")
    img = np.zeros((120, 160, 3), np.uint8)
    img[..., 1] = np.linspace(40, 200, 160, dtype=np.uint8)[None]
    img[30:80, 40:100] = (220, 110, 110)
    Image.fromarray(img).save(tmp / "frame.png")
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "demo" / "app.py"), "--model", ck, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("demo exited: " + proc.stdout.read()[-3000:])
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("demo did not start within 120 s")
    yield {"url": url, "ck": ck, "image": tmp / "frame.png", "broken": tmp / "broken.png"}
    proc.terminate()
    proc.wait(timeout=30)


def test_gradio_client_segments(demo_server):
    from gradio_client import Client, handle_file

    c = Client(demo_server["url"], verbose=False)
    annotated, table, overlay, zipped, legend = c.predict(
        handle_file(str(demo_server["image"])), "polyp\nthe grasper", 0.5, demo_server["ck"], "true",
        api_name="/segment")
    rows = table["data"]
    assert [r[0] for r in rows] == ["polyp", "the grasper"] and rows[0][3] == "presence"
    ann = annotated.get("value", annotated)  # a component update carries the legend colours too
    assert [a["label"] for a in ann["annotations"]] == ["polyp", "the grasper"]
    assert annotated.get("color_map", {}).get("polyp") == "#e6194b"  # same colour as the overlay PNG
    assert Image.open(overlay).size == (160, 120)
    import zipfile

    assert len(zipfile.ZipFile(zipped).namelist()) == 2
    assert "polyp" in legend


def test_gradio_client_clear_errors(demo_server):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    c = Client(demo_server["url"], verbose=False)
    with pytest.raises(AppError, match="at least one prompt"):
        c.predict(handle_file(str(demo_server["image"])), "  ", 0.5, demo_server["ck"], "true", api_name="/segment")
    with pytest.raises(AppError, match="Could not read broken.png"):
        c.predict(handle_file(str(demo_server["broken"])), "polyp", 0.5, demo_server["ck"], "true",
                  api_name="/segment")
    with pytest.raises(AppError, match="local checkpoint folder|Could not load model"):
        c.predict(handle_file(str(demo_server["image"])), "polyp", 0.5, "clip-b16-film", "true",
                  api_name="/segment")


def test_browser_upload_prompt_click_overlay(demo_server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(demo_server["url"], wait_until="domcontentloaded")
        page.wait_for_selector("#upload input[type=file]", state="attached", timeout=60_000)
        page.set_input_files("#upload input[type=file]", str(demo_server["image"]))
        page.wait_for_timeout(1000)
        page.fill("#prompts textarea", "polyp\nthe grasper")
        page.click("#run")
        page.wait_for_selector("#annotated img", timeout=60_000)
        page.wait_for_selector("#legend", timeout=30_000)
        imgs = page.locator("#annotated img")
        assert imgs.count() >= 2  # base image + one mask layer per prompt
        assert "the grasper" in page.inner_text("#legend")
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "demo_segmented.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "demo_segmented.png").stat().st_size > 10_000
