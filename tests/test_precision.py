"""Precision modes (vlseg.precision): fidelity of every mode, auto's fallbacks, the calibration cache, and that
variants never touch the fp32 model."""

import json
import threading

import numpy as np
import pytest
import torch

import vlseg
from helpers import spy_on_auto_calibration, with_strong_lora
from vlseg import precision as P

IMAGES = P.sample_images(n=2, size=64)
PROMPTS = ["polyp", "liver"]


@pytest.fixture(scope="module")
def clipseg(clipseg_dir):
    return vlseg.create_model("clipseg-rd64-refined", pretrained=clipseg_dir).eval()


def _probs(model, images=IMAGES, prompts=PROMPTS):
    return np.stack(vlseg.segment(model, images, prompts, return_probs=True))


def test_machine_info_describes_this_machine():
    info = P.machine_info("cpu")
    assert info.threads >= 1 and info.torch_version == torch.__version__
    assert info.flags <= frozenset(P.RELEVANT_FLAGS)
    assert info.cpu_model in info.describe() and "torch" in info.describe()
    modes = P.available_modes("cpu", info)
    assert modes[0] == "fp32" and set(modes) <= set(P.MODES)
    assert ("bf16" in modes) == info.cpu_bf16 and ("int8" in modes) == info.cpu_int8
    assert ("onnx" in modes) == P.ort.available()


@pytest.mark.parametrize("flags,expected", [
    (frozenset({"avx2", "fma"}), ["fp32", "int8"]),
    (frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}), ["fp32", "bf16", "int8"]),
    (frozenset({"amx_bf16", "amx_int8", "avx512f", "avx2"}), ["fp32", "bf16", "int8"]),
    (frozenset(), ["fp32"]),
])
def test_available_modes_follow_the_cpu_flags(flags, expected, monkeypatch):
    info = P.MachineInfo("test cpu", flags, "AVX2", 2, torch.__version__, ("x86", "fbgemm"))
    monkeypatch.setattr(P.ort, "available", lambda: False)
    assert P.available_modes("cpu", info) == expected
    monkeypatch.setattr(P.ort, "available", lambda: True)  # ONNX Runtime installed: its modes join
    assert P.available_modes("cpu", info) == expected + (["onnx", "onnx-int8"] if "int8" in expected else ["onnx"])


def test_cuda_offers_bf16_only_where_native():
    info = P.MachineInfo("cpu", frozenset(), "AVX2", 2, torch.__version__, (), "GPU", (8, 0), True)
    assert P.available_modes("cuda", info) == ["fp32", "bf16"]
    old = P.MachineInfo("cpu", frozenset(), "AVX2", 2, torch.__version__, (), "GPU", (7, 0), False)
    assert P.available_modes("cuda", old) == ["fp32"]
    assert "int8" not in P.runnable_modes("cuda")


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_modes_stay_close_to_fp32_on_tiny_models(mode, tiny, clipseg):
    # the tiny composed model's random decoder gives probabilities ~0.5 everywhere, so compare probabilities;
    # the tiny CLIPSeg gives real masks, so compare those too
    ref = _probs(tiny)
    assert np.abs(_probs(P.variant(tiny, mode)) - ref).max() < 0.02
    f = P.fidelity(clipseg, mode, IMAGES, PROMPTS)
    assert f.pairs == 4 and f.mode == mode
    assert f.mean_iou >= 0.95, f
    # random CLIPSeg logits are steep: a few boundary pixels move a lot, the average hardly at all
    assert f.mean_prob_diff < 0.01 and f.max_prob_diff < 0.6, f


def test_fp32_is_the_model_itself(tiny):
    assert P.variant(tiny, "fp32") is tiny
    f = P.fidelity(tiny, "fp32", IMAGES, PROMPTS)
    assert f.mean_iou == f.min_iou == 1.0 and f.max_prob_diff == 0.0


def test_unknown_or_impossible_modes_raise(tiny):
    with pytest.raises(ValueError, match="fp32"):
        P.variant(tiny, "fp16")
    with pytest.raises(ValueError, match="resolve"):
        P.variant(tiny, "auto")
    with pytest.raises(ValueError, match="auto"):
        P.resolve(tiny, "half")


def test_variant_is_cached_shares_the_decoder_and_copies_the_encoders(tiny):
    v = P.variant(tiny, "int8")
    assert P.variant(tiny, "int8") is v
    assert v.decoder is tiny.decoder and v.processor is tiny.processor and v.config is tiny.config
    assert v.image_encoder is not tiny.image_encoder
    assert any("quantized" in type(m).__module__ for m in v.image_encoder.modules())
    assert not any("quantized" in type(m).__module__ for m in tiny.modules())
    assert all(p.dtype == torch.float32 for p in tiny.parameters())
    # untouched tensors are shared, not duplicated; converted layers own new ones
    ours = {id(p) for p in tiny.parameters()}
    assert {id(p) for p in v.image_encoder.backbone.ln_pre.parameters()} <= ours
    assert not {id(p) for p in P.variant(tiny, "bf16").image_encoder.parameters() if p.dtype == torch.bfloat16} & ours
    # new encoder weights (a training step) make a new snapshot
    with torch.no_grad():
        next(tiny.image_encoder.parameters()).add_(0.0)
    assert P.variant(tiny, "int8") is not v


def test_variants_never_change_the_fp32_model_or_its_checkpoint(tiny, tmp_path):
    from safetensors.torch import load_file

    tiny.unfreeze("image")  # trainable flags must survive building variants too
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    before_probs = _probs(tiny)
    before_state = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny.save_pretrained(str(tmp_path / "a"))
    for mode in ("bf16", "int8"):
        _probs(P.variant(tiny, mode))
    np.testing.assert_array_equal(_probs(tiny), before_probs)
    after = tiny.state_dict()
    assert flags == {n: p.requires_grad for n, p in tiny.named_parameters()}
    assert before_state.keys() == after.keys()
    assert all(torch.equal(before_state[k], after[k]) for k in before_state)
    tiny.save_pretrained(str(tmp_path / "b"))
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == \
        json.loads((tmp_path / "b" / "config.json").read_text())


def test_lora_is_merged_into_the_copy(tiny):
    with_strong_lora(tiny)
    ref = _probs(tiny)
    v = P.variant(tiny, "bf16")
    assert not any("lora_" in n for n, _ in v.image_encoder.named_parameters())
    assert any("lora_" in n for n, _ in tiny.image_encoder.named_parameters())  # the original keeps its adapters
    assert np.abs(_probs(v) - ref).max() < 0.02


def test_variant_from_two_threads(clipseg):
    v = P.variant(clipseg, "int8")
    expected = _probs(v, IMAGES[:1])
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(_probs(P.variant(clipseg, "int8"), IMAGES[:1]))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 6 and all(np.array_equal(r, expected) for r in results)


def test_calibration_is_written_once_and_reused(clipseg, tmp_path, monkeypatch):
    monkeypatch.setenv("VLSEG_CACHE", str(tmp_path))
    c = P.calibrate(clipseg, IMAGES, PROMPTS, repeats=1, bar=P.FidelityBar(0.9, 0.5))
    files = list((tmp_path / "precision").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["chosen"] == c.chosen
    assert set(c.seconds) == set(P.available_modes("cpu")) and c.passed["fp32"]
    assert c.chosen in c.seconds and c.machine == P.machine_info("cpu").describe()

    def fail(*a, **k):
        raise AssertionError("calibration ran again instead of reading the cache")

    monkeypatch.setattr(P, "_timings", fail)
    again = P.calibrate(clipseg, IMAGES, PROMPTS, repeats=1, bar=P.FidelityBar(0.9, 0.5))
    assert again == c


def test_auto_picks_the_fastest_passing_mode(clipseg, tmp_path, monkeypatch):
    monkeypatch.setenv("VLSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "available_modes", lambda device="cpu", info=None: ["fp32", "bf16", "int8"])
    speed = {"fp32": 1.0, "bf16": 0.5, "int8": 0.3}
    monkeypatch.setattr(P, "_timings", lambda fns, repeats, device: {m: speed[m] for m in fns})
    assert P.resolve(clipseg, "auto") == "int8"
    monkeypatch.setattr(P, "calibrate", None)  # remembered: no second calibration, not even a cache read
    assert P.resolve(clipseg, "auto") == "int8"
    P._RESOLVED.pop(clipseg)


def test_auto_never_picks_a_mode_that_fails_the_bar(clipseg, tmp_path, monkeypatch):
    monkeypatch.setenv("VLSEG_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "_timings", lambda fns, repeats, device: {m: {"fp32": 1.0}.get(m, 0.1) for m in fns})
    c = P.calibrate(clipseg, IMAGES, PROMPTS, repeats=1, bar=P.FidelityBar(1.01, 1.01), modes=["fp32", "int8"])
    assert c.chosen == "fp32" and c.passed == {"fp32": True, "int8": False}


def test_auto_falls_back_to_fp32(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VLSEG_CACHE", str(tmp_path))
    # a machine without fast modes: no calibration at all
    monkeypatch.setattr(P.ort, "available", lambda: False)
    monkeypatch.setattr(P, "machine_info", lambda device=None: P.MachineInfo("old cpu", frozenset(), "DEFAULT", 1,
                                                                              torch.__version__, ()))
    assert P.available_modes("cpu") == ["fp32"]
    assert P.resolve(tiny, "auto") == "fp32"
    assert not (tmp_path / "precision").exists()
    # calibration failing for any reason: fp32, a warning in the log, never an exception
    monkeypatch.setattr(P, "available_modes", lambda device="cpu", info=None: ["fp32", "int8"])

    def broken(*a, **k):
        raise RuntimeError("no int8 kernels")

    monkeypatch.setattr(P, "calibrate", broken)
    P._RESOLVED.pop(tiny, None)
    assert P.resolve(tiny, "auto") == "fp32"


def test_explicit_modes_resolve_to_themselves(tiny, monkeypatch):
    assert P.resolve(tiny, "fp32") == "fp32"
    assert P.resolve(tiny, "int8") == "int8"
    monkeypatch.setattr(P, "available_modes", lambda device="cpu", info=None: ["fp32"])
    with pytest.warns(UserWarning, match="emulated"):
        assert P.resolve(tiny, "bf16") == "bf16"


def test_segment_and_predict_take_a_precision():
    """segment/predict(precision=...) run the converted copy; masks stay close to fp32; families that declare only
    fp32 refuse other modes (and auto falls back to fp32 for them)."""
    import numpy as np

    import vlseg

    m = vlseg.create_model("tiny-test", pretrained=False)
    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype("uint8")
    ref = vlseg.segment(m, img, ["polyp", "vessel"], return_probs=True)
    for mode in [p for p in ("int8", "bf16") if p in P.available_modes("cpu")]:
        out = vlseg.segment(m, img, ["polyp", "vessel"], return_probs=True, precision=mode)
        assert out.shape == ref.shape and np.abs(out - ref).max() < 0.05
        pred = vlseg.predict(m, img, ["polyp"], precision=mode)
        assert pred.probs.shape == (1, 40, 56)
    auto = vlseg.segment(m, img, ["polyp"], precision="auto", return_probs=True)
    assert auto.shape == (1, 40, 56)
    with pytest.raises(ValueError, match="Unknown precision"):
        vlseg.segment(m, img, ["polyp"], precision="fp8")
    vqa = vlseg.create_model("tiny-test-vqa", pretrained=False)
    with pytest.raises(ValueError, match="run in"):
        vlseg.segment(vqa, img, ["is there a polyp?"], precision="int8")
    assert vlseg.segment(vqa, img, ["is there a polyp?"], precision="auto").shape == (1, 40, 56)


def test_autocast_is_deprecated():
    import numpy as np

    import vlseg

    m = vlseg.create_model("tiny-test", pretrained=False)
    with pytest.warns(DeprecationWarning, match="precision='bf16'"):
        vlseg.segment(m, np.zeros((16, 16, 3), np.uint8), "polyp", autocast=True)


def test_a_sample_without_masks_proves_nothing(tiny, tmp_path, monkeypatch):
    """A trained model's presence head empties its masks on images unlike its data: such a sample cannot show a
    mode is faithful, so no mode passes on it, auto keeps fp32 and nothing is cached."""
    monkeypatch.setenv("VLSEG_CACHE", str(tmp_path))
    with torch.no_grad():
        tiny.decoder.presence_head[1].bias.fill_(-50.0)  # "absent" everywhere: every mask empty
    f = P.fidelity(tiny, "int8", IMAGES, PROMPTS)
    assert f.pairs == 4 and f.informative == 0 and not f.passes(P.FidelityBar(0.0, 0.0))
    monkeypatch.setattr(P, "_timings", lambda fns, repeats, device: {m: {"fp32": 1.0}.get(m, 0.1) for m in fns})
    c = P.calibrate(tiny, IMAGES, PROMPTS, repeats=1, modes=["fp32", "int8"])
    assert c.chosen == "fp32" and not c.passed["int8"] and any("not verified" in n for n in c.notes)
    assert not (tmp_path / "precision").exists()


def test_auto_calibrates_on_the_images_it_is_asked_to_segment(tiny, monkeypatch):
    seen = spy_on_auto_calibration(monkeypatch, tiny)
    imgs = [np.full((40, 50, 3), i * 60, np.uint8) for i in range(5)]
    vlseg.segment(tiny, imgs, ["polyp", "liver"], precision="auto")
    assert len(seen["images"]) == 3 and seen["images"][1] is imgs[1] and seen["prompts"] == ["polyp", "liver"]
    P._RESOLVED.pop(tiny, None)
    vlseg.predict(tiny, imgs[4], ["skin lesion"], precision="auto")
    assert seen["images"][0] is imgs[4] and seen["prompts"] == ["skin lesion"]
    P._RESOLVED.pop(tiny, None)


def _with_flags(monkeypatch, flags):
    import dataclasses

    real = P.machine_info
    monkeypatch.setattr(P, "machine_info", lambda device=None: dataclasses.replace(real(device),
                                                                                   flags=frozenset(flags)))


def _attn_impls(module):
    return {c._attn_implementation for m in module.modules()
            if (c := getattr(m, "config", None)) is not None and hasattr(c, "_attn_implementation")}


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_bf16_attention_only_in_copies_and_only_where_bf16_is_native(mode, clipseg, monkeypatch):
    ref = _probs(clipseg)
    fp32_impls = _attn_impls(clipseg.image_encoder)
    P.drop_variants(clipseg)
    _with_flags(monkeypatch, {"avx2", "avx512f", "avx512_bf16"})
    v = P.variant(clipseg, mode)
    assert _attn_impls(v.image_encoder) == {P.BF16_ATTENTION}
    assert any(isinstance(m, P._QuickGELU) for m in v.image_encoder.modules())
    # the fp32 model (and the text encoder copy, whose attention is masked) keep theirs
    assert _attn_impls(clipseg.image_encoder) == fp32_impls != {P.BF16_ATTENTION}
    assert P.BF16_ATTENTION not in _attn_impls(v.text_encoder)
    assert not any(isinstance(m, P._QuickGELU) for m in clipseg.modules())
    probs = _probs(v)
    assert np.abs(probs - ref).mean() < 0.01
    assert P.fidelity(clipseg, mode, IMAGES, PROMPTS).mean_iou >= 0.95
    # without native bf16 (AVX2 only) the copy keeps transformers' attention
    P.drop_variants(clipseg)
    _with_flags(monkeypatch, {"avx2", "fma"})
    assert _attn_impls(P.variant(clipseg, mode).image_encoder) == fp32_impls
    P.drop_variants(clipseg)


def test_bf16_attention_function_matches_sdpa_and_falls_back_when_masked():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 50, 16, generator=g) for _ in range(3))
    module = torch.nn.Module().eval()
    module.is_causal = False
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    out, weights = P._bf16_attention(module, q, k, v, None, scaling=0.25)
    assert out.shape == expected.shape == (2, 50, 4, 16) and out.dtype == torch.float32 and weights is None
    assert 0 < (out - expected).abs().max() < 0.05  # bf16 rounding, not another function
    mask = torch.zeros(2, 1, 50, 50)
    mask[..., 40:] = float("-inf")
    out, _ = P._bf16_attention(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0])
    causal, _ = P._bf16_attention(module, q, k, v, None, scaling=0.25, is_causal=True)
    torch.testing.assert_close(causal, sdpa_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=True)[0])


def test_quick_gelu_replacement_is_exact():
    from transformers.activations import QuickGELUActivation

    x = torch.randn(3, 7, 64) * 4
    torch.testing.assert_close(P._QuickGELU()(x), QuickGELUActivation()(x), rtol=0, atol=0)
