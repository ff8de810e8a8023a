"""Concurrency: ``vlseg.segment`` called from several threads on one model gives exactly the serial results (the
prompt cache is shared under a lock, weights are only read); the Gradio demo answers 8 simultaneous clients
correctly (its queue and lock serialise inference)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlseg

ROOT = Path(__file__).resolve().parents[1]
PROMPT_SETS = [["polyp"], ["polyp", "the grasper"], ["a small round lesion", "polyp", "liver"], ["grasper"],
               ["the larger lesion on the left"], ["polyp", "Polyp", "instrument tip"]]


def make_images(n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        h, w = 40 + 8 * i, 56 + 4 * i
        img = (rng.random((h, w, 3)) * 80).astype(np.uint8)
        img[h // 4: h // 2, w // 3: w // 2] = (220, 110, 110)
        out.append(img)
    return out


def _threaded(model: vlseg.VLSegModel, images: list[np.ndarray], jobs: list[tuple[int, list[str]]], threads: int,
              repeats: int) -> list[tuple[int, np.ndarray]]:
    work = [j for j in jobs for _ in range(repeats)]
    order = np.random.default_rng(0).permutation(len(work))
    with ThreadPoolExecutor(threads) as pool:
        futures = [(work[k][0], pool.submit(vlseg.segment, model, images[work[k][0]], work[k][1], return_probs=True))
                   for k in order]
        return [(i, f.result(timeout=300)) for i, f in futures]


def serial_then_threads(model: vlseg.VLSegModel, threads: int = 4, repeats: int = 3) -> None:
    """Warm prompt cache: threaded results are bit-identical to serial ones. Cold cache (threads racing to encode
    the same new prompts): identical up to the float noise of encoding a prompt in a different batch (padding to
    another length), and the same masks."""
    images = make_images()
    jobs = [(i, PROMPT_SETS[i % len(PROMPT_SETS)]) for i in range(len(images))]
    model.clear_cache()
    serial = [vlseg.segment(model, images[i], p, return_probs=True) for i, p in jobs]
    for i, probs in _threaded(model, images, jobs, threads, repeats):
        assert np.array_equal(probs, serial[i]), f"image {i}: max diff {np.abs(probs - serial[i]).max()}"
    model.clear_cache()
    for i, probs in _threaded(model, images, jobs, threads, repeats):
        ref = serial[i]
        assert probs.shape == ref.shape
        assert np.allclose(probs, ref, atol=1e-5), f"image {i}: max diff {np.abs(probs - ref).max()}"
        sure = np.abs(ref - 0.5) > 1e-4
        assert np.array_equal((probs > 0.5)[sure], (ref > 0.5)[sure])
    # batches from threads too
    ref_b = vlseg.segment(model, images, PROMPT_SETS[1], return_probs=True, batch_size=3)
    with ThreadPoolExecutor(threads) as pool:
        batched = list(pool.map(lambda p: vlseg.segment(model, images, p, return_probs=True, batch_size=3),
                                [PROMPT_SETS[1]] * threads))
    for b in batched:
        assert all(np.array_equal(x, y) for x, y in zip(b, ref_b))


def test_segment_threads_equal_serial_open_clip(tiny):
    serial_then_threads(tiny)


def test_segment_threads_equal_serial_hf_clipseg(clipseg_dir):
    """transformers towers, including the cached interpolated position embedding."""
    serial_then_threads(vlseg.create_model("clipseg-rd64-refined", pretrained=clipseg_dir))


def test_predict_threads_match(tiny):
    images = make_images(4)
    ref = [vlseg.predict(tiny, im, ["polyp", "grasper"]) for im in images]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda im: vlseg.predict(tiny, im, ["polyp", "grasper"]), images * 2))
    for r, g in zip(ref * 2, got):
        assert np.array_equal(r.masks, g.masks) and np.allclose(r.presence, g.presence, atol=1e-6)


# ----------------------------------------------------------------------------------------------- the demo
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pytest.importorskip("gradio")  # the demo is an optional extra, as in test_demo.py
    pytest.importorskip("gradio_client")
    tmp = tmp_path_factory.mktemp("demo-concurrent")
    torch.manual_seed(5)
    m = vlseg.create_model("tiny-test", pretrained=False)
    ck = m.save_pretrained(tmp / "ck")
    files = []
    for i, img in enumerate(make_images(8 // 2)):
        Image.fromarray(img).save(tmp / f"frame{i}.png")
        files.append(tmp / f"frame{i}.png")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "demo" / "app.py"), "--model", ck, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
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
        pytest.fail("demo did not start within 180 s")
    yield {"url": f"http://127.0.0.1:{port}/", "ck": ck, "files": files}
    proc.terminate()
    proc.wait(timeout=30)


def test_demo_eight_concurrent_clients(demo):
    from gradio_client import Client, handle_file

    model = vlseg.load(demo["ck"])
    requests = [(demo["files"][k % len(demo["files"])], PROMPT_SETS[k % len(PROMPT_SETS)]) for k in range(8)]
    Client(demo["url"], verbose=False).predict(handle_file(str(requests[0][0])), "polyp", 0.5, demo["ck"], "true",
                                               api_name="/segment")  # load the model once before the burst

    def ask(req):
        path, prompts = req
        client = Client(demo["url"], verbose=False)
        return client.predict(handle_file(str(path)), "\n".join(prompts), 0.5, demo["ck"], "true",
                              api_name="/segment")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, requests))
    assert len(answers) == 8
    for (path, prompts), (_annotated, table, overlay, zipped, _legend) in zip(requests, answers):
        pred = vlseg.predict(model, np.asarray(Image.open(path).convert("RGB")), prompts, threshold=0.5)
        rows = table["data"]
        assert [r[0] for r in rows] == prompts, (path.name, rows)
        for r, score, mask in zip(rows, pred.presence, pred.masks):
            assert abs(float(r[1]) - round(float(score), 3)) <= 1e-3 and int(r[2]) == int(mask.sum()), (path, r)
        assert Image.open(overlay).size == Image.open(path).size
        names = zipfile.ZipFile(zipped).namelist()
        assert len(names) == len(prompts) == len(set(names))
