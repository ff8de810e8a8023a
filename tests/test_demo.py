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
    vqa = vlseg.create_model("tiny-test-vqa", pretrained=False)
    with torch.no_grad():
        vqa.decoder.presence_head[1].bias.fill_(10.0)  # every answer "refers to a region"
        vqa.decoder.upsample[-1].bias.fill_(2.0)  # and the grounding mask is not empty
    vqa_ck = vqa.save_pretrained(tmp / "vqa_ck")
    img = np.zeros((120, 160, 3), np.uint8)
    img[..., 1] = np.linspace(40, 200, 160, dtype=np.uint8)[None]
    img[30:80, 40:100] = (220, 110, 110)
    Image.fromarray(img).save(tmp / "frame.png")
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "demo" / "app.py"), "--model", ck, "--vqa-model", vqa_ck,
                             "--port", str(port)],
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
    yield {"url": url, "ck": ck, "vqa_ck": vqa_ck, "image": tmp / "frame.png", "broken": tmp / "broken.png"}
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
    # masks are translucent with an opaque outline, so a later mask does not hide an earlier one
    layer = ann["annotations"][0]["image"]
    alpha = np.asarray(Image.open(layer if isinstance(layer, str) else layer["path"]).convert("RGBA"))[..., 3]
    inside = set(np.unique(alpha).tolist()) - {0, 255}
    assert len(inside) == 1 and 60 < inside.pop() < 180 and 0 < (alpha == 255).sum() < (alpha > 0).sum()


def test_gradio_client_segments_with_the_sam3_preset(demo_server):
    """SAM 3 is one more preset in the demo's model picker: the tiny random one, built offline."""
    from gradio_client import Client, handle_file

    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_app", ROOT / "demo" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert {"sam3", "sam3-litetext", "tiny-test-sam3"} <= set(app.checkpoint_choices(None))  # in the picker
    c = Client(demo_server["url"], verbose=False)
    annotated, table, overlay, zipped, legend = c.predict(
        handle_file(str(demo_server["image"])), "polyp\nthe grasper", 0.5, "tiny-test-sam3", "false",
        api_name="/segment")
    assert [r[0] for r in table["data"]] == ["polyp", "the grasper"]
    assert Image.open(overlay).size == (160, 120)
    import zipfile

    assert len(zipfile.ZipFile(zipped).namelist()) == 2


def test_gradio_client_asks(demo_server):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    c = Client(demo_server["url"], verbose=False)
    annotated, table, answer_html = c.predict(
        handle_file(str(demo_server["image"])), "Is there any grasper in the image?", demo_server["vqa_ck"], "true", 3,
        api_name="/ask")
    rows = table["data"]
    assert len(rows) == 3 and rows[0][1] >= rows[1][1] >= rows[2][1]
    assert f"<b>{rows[0][0]}</b>" in answer_html and "refers to the region shown" in answer_html
    ann = annotated.get("value", annotated)
    assert [a["label"] for a in ann["annotations"]] == [rows[0][0]]
    layer = ann["annotations"][0]["image"]
    assert Image.open(layer if isinstance(layer, str) else layer["path"]).size == (160, 120)  # mask at image size
    with pytest.raises(AppError, match="Type a question"):
        c.predict(handle_file(str(demo_server["image"])), " ", demo_server["vqa_ck"], "true", 3, api_name="/ask")
    with pytest.raises(AppError, match="segmentation model"):
        c.predict(handle_file(str(demo_server["image"])), "Is there any grasper?", demo_server["ck"], "true", 3,
                  api_name="/ask")


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
        assert not page.locator("#pretrained").is_visible()  # a checkpoint folder is chosen: no pretrained box
        # the VQA tab: upload, question, answer with top-k scores, the grounding mask overlaid
        page.get_by_role("tab", name="Ask (VQA)").click()
        page.wait_for_selector("#vqa-upload input[type=file]", state="attached", timeout=30_000)
        assert not page.locator("#vqa-pretrained").is_visible()
        page.set_input_files("#vqa-upload input[type=file]", str(demo_server["image"]))
        page.wait_for_timeout(1000)
        page.fill("#vqa-question textarea", "Is there any grasper in the image?")
        page.click("#ask")
        page.wait_for_selector("#vqa-answer-text", timeout=60_000)
        page.wait_for_selector("#vqa-annotated img", timeout=30_000)
        assert page.locator("#vqa-annotated img").count() >= 2  # the image + the answer's mask layer
        assert "score" in page.inner_text("#vqa-answer-text")
        assert page.locator("#vqa-topk").inner_text().count("\n") >= 3  # header + the top answers
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "demo_vqa.png"), full_page=True)
        page.fill("#vqa-model input", "tiny-test-vqa")  # a preset: now the pretrained box is offered
        page.keyboard.press("Enter")
        page.wait_for_selector("#vqa-pretrained", state="visible", timeout=30_000)
        browser.close()
    assert (ARTIFACTS / "demo_segmented.png").stat().st_size > 10_000
    assert (ARTIFACTS / "demo_vqa.png").stat().st_size > 10_000
