"""ONNX Runtime precision modes (vlseg.ort): exact in fp32, faithful in int8, exported once and cached, calls it
was not exported for run the fp32 encoder, and a clear refusal where onnxruntime is not installed."""

import numpy as np
import pytest
import torch

import vlseg
from helpers import with_strong_lora
from vlseg import ort
from vlseg import precision as P

pytestmark = pytest.mark.skipif(not ort.available(), reason="onnxruntime / onnx not installed (the onnx extra)")

IMAGES = P.sample_images(n=2, size=64)
PROMPTS = ["polyp", "liver"]


def _probs(model):
    return np.stack(vlseg.segment(model, IMAGES, PROMPTS, return_probs=True))


@pytest.fixture()
def lora_tiny(tiny):
    return with_strong_lora(tiny)


def test_onnx_is_exact_and_onnx_int8_close_on_composed_models(lora_tiny):
    ref = _probs(lora_tiny)
    exact = P.variant(lora_tiny, "onnx")
    assert isinstance(exact.image_encoder, ort.OrtImageEncoder)
    assert np.abs(_probs(exact) - ref).max() < 1e-4  # same maths, LoRA merged into the export
    assert exact.image_encoder.stats["ort_calls"] == 1 and exact.image_encoder.stats["fallback_calls"] == 0
    q = P.variant(lora_tiny, "onnx-int8")
    d = np.abs(_probs(q) - ref)
    assert 0 < d.max() < 0.05  # quantised (not the fp32 graph), and close
    assert any("quantized" in type(m).__module__ for m in q.text_encoder.modules())  # the text side is torch int8
    assert all(p.dtype == torch.float32 for p in lora_tiny.parameters())  # the fp32 model is untouched


def test_clipseg_fidelity(clipseg_dir):
    m = vlseg.create_model("clipseg-rd64-refined", pretrained=clipseg_dir).eval()
    f = P.fidelity(m, "onnx", IMAGES, PROMPTS)
    assert f.mean_iou == 1.0 and f.max_prob_diff < 1e-4, f
    q = P.fidelity(m, "onnx-int8", IMAGES, PROMPTS)
    assert q.mean_iou >= 0.95 and q.mean_prob_diff < 0.01, q


def test_export_is_cached_on_disk_and_reused(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VLSEG_CACHE", str(tmp_path))
    v = P.variant(tiny, "onnx-int8")
    _probs(v)
    files = sorted((tmp_path / "onnx").glob("*.onnx"))
    assert len(files) == 1 and "int8" in files[0].name and v.image_encoder.stats["exports"] == 1
    assert not list((tmp_path / "onnx").glob(".tmp-*"))  # written atomically, nothing left behind
    stamp = files[0].stat().st_mtime_ns
    P.drop_variants(tiny)
    again = P.variant(tiny, "onnx-int8")
    assert again is not v
    _probs(again)
    assert again.image_encoder.stats["exports"] == 0 and files[0].stat().st_mtime_ns == stamp
    # new weights: a new fingerprint, a new export (the old file is never reused for other weights)
    with torch.no_grad():
        for p in tiny.image_encoder.parameters():
            p.mul_(1.01)
    _probs(P.variant(tiny, "onnx-int8"))
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2


def test_calls_it_was_not_exported_for_run_the_fp32_encoder(tiny):
    enc = P.variant(tiny, "onnx").image_encoder
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tiny.image_encoder(x, [0, 2], pooled=True)
        got = enc(x, [0, 2], pooled=True)
    assert enc.stats["fallback_calls"] == 1 and enc.stats["ort_calls"] == 0
    assert all(torch.equal(a, b) for a, b in zip(ref.tokens, got.tokens)) and torch.equal(ref.pooled, got.pooled)
    with torch.no_grad():
        a = tiny.image_encoder(x, tiny.decoder.layers)
        b = enc(x, tiny.decoder.layers)
    assert enc.stats["ort_calls"] == 1
    assert (a.grid, a.num_prefix_tokens, a.image_size) == (b.grid, b.num_prefix_tokens, b.image_size)
    assert all(torch.allclose(s, t, atol=1e-5) for s, t in zip(a.tokens, b.tokens))
    assert enc.info == tiny.image_encoder.info  # the encoder's declared facts pass through


def test_export_image_encoder_for_deployment(tiny, tmp_path):
    import onnx
    import onnxruntime

    path = ort.export_image_encoder(tiny, tmp_path / "image_encoder.onnx")
    assert path.read_bytes()[:1] != b"\x80"  # a protobuf, not a pickle
    onnx.checker.check_model(str(path))
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    assert [o.name for o in sess.get_outputs()] == [f"layer{i}" for i in tiny.decoder.layers]
    x = torch.randn(3, 3, 64, 64)  # a batch of three through the dynamic batch axis
    outs = sess.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref = tiny.image_encoder(x, tiny.decoder.layers).tokens
    assert all(np.allclose(o, r.numpy(), atol=1e-5) for o, r in zip(outs, ref))


def test_without_onnxruntime_the_modes_are_not_offered(tiny, monkeypatch):
    monkeypatch.setattr(ort, "available", lambda: False)
    assert not {"onnx", "onnx-int8"} & set(P.available_modes("cpu")) and "onnx" not in P.runnable_modes("cpu")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        P.resolve(tiny, "onnx")
    with pytest.raises(ImportError, match=r"pip install 'vlseg\[onnx\]'"):
        ort.OrtImageEncoder(tiny.image_encoder, [0], "key", int8=False)


def test_onnx_modes_are_cpu_only():
    assert not {"onnx", "onnx-int8"} & set(P.runnable_modes("cuda"))


def test_a_failed_export_says_why_and_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    """A full disk shows up as a protobuf decode error deep inside onnxruntime's quantiser: the error names the
    export, the cause and the free space, and no partial file is cached."""
    import onnxruntime.quantization as q

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(q, "quantize_dynamic", full_disk)
    target = tmp_path / "enc-int8.onnx"
    with pytest.raises(RuntimeError, match=r"ONNX int8 export .*No space left on device.*Free space: [0-9.]+ GiB"):
        ort.export_encoder(tiny.image_encoder, tiny.decoder.layers, (64, 64), target, int8=True)
    assert list(tmp_path.iterdir()) == []
