"""The sam3 family on tiny random SAM 3 models written offline in the upstream layout: parity with transformers'
documented pipeline, one vision pass for K prompts, box prompts, loading, checkpoints, fine-tuning."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DATA
from PIL import Image
from safetensors.torch import load_file

import vlseg

ROOT = Path(__file__).resolve().parents[1]


def tiny_sam3_dir() -> str:
    """The tiny-test-sam3 architecture with random weights (detector heads spread so scores differ), saved by
    transformers with its processor: written once per test session under $VLSEG_CACHE."""
    from vlseg.families.sam3 import write_upstream_folder

    folder = Path(os.environ["VLSEG_CACHE"]) / "tiny-sam3-upstream"
    if not (folder / "model.safetensors").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        write_upstream_folder(tmp, "tiny-test-sam3", seed=0)
        try:
            os.replace(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def disc_image(h=90, w=130, seed=0):
    """A non-square grey image with two bright discs (the processor squashes, it does not pad)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    sem = ((yy - 30) ** 2 + (xx - 40) ** 2 <= 15**2) | ((yy - 60) ** 2 + (xx - 95) ** 2 <= 12**2)
    img = np.clip(60 + rng.normal(0, 15, (h, w)) + 160 * sem, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([img] * 3, -1)), sem


@pytest.fixture(scope="module")
def sam3_dir():
    return tiny_sam3_dir()


@pytest.fixture(scope="module")
def model(sam3_dir):
    return vlseg.create_model("tiny-test-sam3", pretrained=sam3_dir)


@pytest.fixture(scope="module")
def reference(sam3_dir):
    from transformers import Sam3Model, Sam3Processor

    return Sam3Model.from_pretrained(sam3_dir).eval(), Sam3Processor.from_pretrained(sam3_dir)


def run_reference(reference, image, prompt, threshold, boxes=None, labels=None):
    """transformers' documented pipeline: Sam3Processor + Sam3Model + post_process_instance_segmentation."""
    up, proc = reference
    inputs = proc(images=image, text=prompt, input_boxes=boxes, input_boxes_labels=labels, return_tensors="pt")
    with torch.inference_mode():
        out = up(**inputs)
    size = inputs["original_sizes"].tolist()
    res = proc.post_process_instance_segmentation(out, threshold=threshold, mask_threshold=0.5, target_sizes=size)[0]
    h, w = size[0]
    keep = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid())[0] > threshold
    probs = torch.nn.functional.interpolate(out.pred_masks[0][keep].sigmoid()[None], size=(h, w), mode="bilinear",
                                            align_corners=False)[0] if keep.any() else torch.zeros(0, h, w)
    res["union_prob"] = probs.amax(0) if len(probs) else torch.zeros(h, w)  # for float-rounding checks
    res["semantic"] = res["masks"].bool().any(0) if len(res["masks"]) else torch.zeros(h, w, dtype=torch.bool)
    res["presence"] = float(out.presence_logits.sigmoid()[0, 0])
    res["all_scores"] = (out.pred_logits.sigmoid() * out.presence_logits.sigmoid())[0]
    return res


def assert_same_masks(mine, ref_masks, ref_prob):
    """Equal, except where the reference probability is within float rounding of the 0.5 mask threshold."""
    diff = np.asarray(mine) != np.asarray(ref_masks)
    if diff.any():
        assert float((ref_prob.numpy()[diff] - 0.5).__abs__().max()) < 1e-5, int(diff.sum())


def test_parity_with_transformers_pipeline(model, reference):
    image, _ = disc_image()
    prompts = ["white disc", "a polyp", "the left kidney"]
    scores = torch.cat([run_reference(reference, image, p, 0.0)["all_scores"] for p in prompts]).sort().values
    middle = float(scores[len(scores) // 2 - 1: len(scores) // 2 + 1].mean())  # between two scores, not on one
    for thr in (0.0, middle, float(scores.max()) + 1e-3):  # all, some, no instances kept
        model.decoder.score_threshold = thr
        try:
            pred = vlseg.predict(model, image, prompts)
        finally:
            model.decoder.score_threshold = 0.3
        assert pred.masks.shape == (3, 90, 130) and len(pred.instances) == 3
        for k, p in enumerate(prompts):
            ref = run_reference(reference, image, p, thr)
            assert_same_masks(pred.masks[k], ref["semantic"], ref["union_prob"])
            inst = pred.instances[k]
            assert len(inst.scores) == len(ref["scores"])  # the same queries kept, in query order
            np.testing.assert_allclose(inst.scores, ref["scores"].numpy(), atol=1e-5)
            np.testing.assert_allclose(inst.boxes, ref["boxes"].numpy(), atol=1e-3)
            for m, rm in zip(inst.masks, ref["masks"]):
                assert (m != rm.bool().numpy()).mean() < 1e-3
            assert pred.presence[k] == pytest.approx(ref["presence"], abs=1e-5)
    # vlseg.segment gives the same masks (the presence gate is off in SAM 3 presets: presence is in the scores)
    masks = vlseg.segment(model, image, prompts)
    np.testing.assert_array_equal(masks, vlseg.predict(model, image, prompts).masks)
    assert model.config.presence_threshold == 0.0


def test_one_vision_pass_for_k_prompts(model):
    vit = model.image_encoder.backbone.backbone
    text_tower = model.text_encoder.backbone
    calls = {"vit": 0, "text": 0}
    hooks = [vit.register_forward_hook(lambda *a: calls.__setitem__("vit", calls["vit"] + 1)),
             text_tower.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))]
    prompts = [f"structure number {i}" for i in range(8)]
    model.clear_cache()
    try:
        image, _ = disc_image()
        first = vlseg.segment(model, image, prompts, return_probs=True)
        assert calls == {"vit": 1, "text": 1}  # one ViT pass for 8 prompts, the 8 prompts encoded in one batch
        again = vlseg.segment(model, image, prompts, return_probs=True)
        assert calls == {"vit": 2, "text": 1}  # prompts come from the cache
        np.testing.assert_array_equal(first, again)
        one = vlseg.segment(model, image, prompts[3], return_probs=True)
        np.testing.assert_allclose(one[0], first[3], atol=1e-5)  # batching K prompts changes nothing
    finally:
        for h in hooks:
            h.remove()


def test_flip_is_refused_for_instances(model):
    """Mirror test-time augmentation averages semantic maps; SAM 3's instances have no such average."""
    with pytest.raises(ValueError, match="instances"):
        vlseg.segment(model, disc_image()[0], "disc", flip=True)


def test_box_prompts_match_transformers(model, reference):
    image, sem = disc_image()
    ys, xs = np.nonzero(sem[:, :70])
    pos = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    neg = [80.0, 40.0, 125.0, 85.0]
    prompts = ["white disc", "white disc", "visual"]
    boxes, labels = [None, [pos, neg], [pos]], [None, [1, 0], None]
    thr = 0.0
    model.decoder.score_threshold = thr
    try:
        pred = vlseg.predict(model, image, prompts, boxes=boxes, box_labels=labels)
    finally:
        model.decoder.score_threshold = 0.3
    for k, p in enumerate(prompts):
        b = boxes[k]
        ref = run_reference(reference, image, None if p == "visual" else p, thr, [b] if b else None,
                            [labels[k] or [1] * len(b)] if b else None)
        assert_same_masks(pred.masks[k], ref["semantic"], ref["union_prob"])
        np.testing.assert_allclose(pred.instances[k].scores, ref["scores"].numpy(), atol=1e-5)
    # a box-only prompt and a text-only prompt in one call: the text-only one is unchanged by its neighbour
    alone = vlseg.segment(model, image, ["white disc"], return_probs=True)
    np.testing.assert_allclose(vlseg.segment(model, image, prompts, boxes=boxes, box_labels=labels,
                                             return_probs=True)[0], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match="one entry per prompt"):
        vlseg.segment(model, image, prompts, boxes=[[pos]])
    with pytest.raises(ValueError, match="no area"):
        vlseg.segment(model, image, ["x"], boxes=[[[5, 5, 5, 9]]])
    with pytest.raises(ValueError, match="single 2D image"):
        vlseg.segment(model, [image, image], ["x"], boxes=[[pos]])
    with pytest.raises(ValueError, match="take no box prompts"):
        vlseg.segment(vlseg.create_model("tiny-test", pretrained=False), image, ["x"], boxes=[[pos]])
    # bf16 autocast on the CPU: the box group runs in float32 (roi_align has no CPU bf16 kernel under autocast)
    assert vlseg.segment(model, image, prompts, boxes=boxes, box_labels=labels, autocast=True).shape == (3, 90, 130)


def test_long_prompt_is_truncated_with_a_warning(model):
    long = "an irregular " + "very " * 40 + "bright round lesion"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        masks = vlseg.segment(model, disc_image()[0], [long, "white disc"])
    assert masks.shape == (2, 90, 130)
    assert any("truncated" in str(x.message) for x in w)
    ids = model.text_encoder.tokenize([long])["input_ids"]
    assert ids.shape == (1, 32) and int(ids[0, -1]) == 49407  # <|endoftext|> kept as the 32nd token


def test_upstream_loading_paths(sam3_dir, tmp_path):
    m = vlseg.create_model("sam3", pretrained=sam3_dir)  # the real preset, pointed at a local upstream folder
    assert m.processor.size == 112 and m.image_encoder.video is not None  # size from the folder; tracker loaded
    assert vlseg.create_model("sam3", pretrained=sam3_dir, image_size=140).processor.size == 140
    with pytest.raises(ValueError, match="multiple of its patch size"):
        vlseg.create_model("sam3", pretrained=sam3_dir, image_size=120)
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    shutil.copy(Path(sam3_dir) / "config.json", bin_only / "config.json")
    (bin_only / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(vlseg.SourceError, match="only pickle weights"):
        vlseg.create_model("sam3", pretrained=str(bin_only))
    with pytest.raises(vlseg.CheckpointError, match="upstream transformers folder"):
        vlseg.load(sam3_dir)
    with pytest.raises(ValueError, match="Unknown sam3 family option"):
        vlseg.create_model("tiny-test-sam3", pretrained=False, family_options={"scor_threshold": 0.5})


def test_sam3_lite_text_folder(tmp_path):
    from transformers import Sam3ImageProcessor, Sam3LiteTextConfig, Sam3LiteTextModel, Sam3Processor

    from vlseg.families.sam3 import offline_clip_tokenizer

    det = dict(vlseg.get_model_config("tiny-test-sam3").arch["detector_config"])
    det.pop("model_type")
    det["text_config"] = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                          "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77}
    torch.manual_seed(0)
    Sam3LiteTextModel(Sam3LiteTextConfig(**det)).eval().save_pretrained(tmp_path)
    Sam3Processor(image_processor=Sam3ImageProcessor(size={"height": 112, "width": 112}, image_mean=[0.5] * 3,
                                                     image_std=[0.5] * 3),
                  tokenizer=offline_clip_tokenizer()).save_pretrained(tmp_path)
    m = vlseg.create_model("sam3-litetext", pretrained=str(tmp_path))
    assert type(m.text_encoder.backbone).__name__ == "Sam3LiteTextTextModel" and m.image_encoder.video is None
    image, _ = disc_image()
    m.decoder.score_threshold = 0.0
    pred = vlseg.predict(m, image, ["white disc", "liver"])
    ref = (Sam3LiteTextModel.from_pretrained(tmp_path).eval(), Sam3Processor.from_pretrained(tmp_path))
    for k, p in enumerate(["white disc", "liver"]):
        r = run_reference(ref, image, p, 0.0)
        assert_same_masks(pred.masks[k], r["semantic"], r["union_prob"])
    with pytest.raises(ValueError, match="cannot track"):  # no tracker in a detector-only checkpoint
        vlseg.segment_video(m, np.zeros((2, 40, 40, 3), np.uint8), ["x"], track=True, progress=False)


def test_trainable_only_checkpoint_round_trip(sam3_dir, tmp_path):
    m = vlseg.create_model("tiny-test-sam3", pretrained=sam3_dir)
    summary = m.trainable_summary()
    assert summary["image_encoder"]["trainable"] == 0 and summary["text_encoder"]["trainable"] == 0
    assert not any(p.requires_grad for p in m.decoder.geometry_encoder.parameters())
    with torch.no_grad():
        m.decoder.mask_decoder.pixel_decoder.conv_layers[0].weight.mul_(1.5)  # "trained"
    m.save_pretrained(tmp_path / "ck")
    keys = load_file(str(tmp_path / "ck" / "model.safetensors"))
    tops = {".".join(k.split(".")[:2]) for k in keys}
    assert tops == {"decoder.detr_encoder", "decoder.detr_decoder", "decoder.mask_decoder",
                    "decoder.dot_product_scoring"}  # encoders, tracker and box encoder are rebuilt from the source
    back = vlseg.load(tmp_path / "ck")
    image, _ = disc_image()
    np.testing.assert_array_equal(vlseg.segment(back, image, ["white disc"], return_probs=True),
                                  vlseg.segment(m, image, ["white disc"], return_probs=True))
    # a random-weight build cannot be rebuilt from a name: its checkpoint bundles everything, tracker included
    r = vlseg.create_model("tiny-test-sam3", pretrained=False)
    r.save_pretrained(tmp_path / "bundled")
    rb = vlseg.load(tmp_path / "bundled")
    for (k, a), b in zip(r.state_dict().items(), rb.state_dict().values()):
        assert torch.equal(a, b), k


def test_training_step_lora_checkpointing_bf16(sam3_dir):
    from vlseg.families._sam3_training import Sam3Loss, make_targets

    m = vlseg.create_model("tiny-test-sam3", pretrained=sam3_dir)
    image, sem = disc_image()
    pv = m.processor([np.asarray(image)])
    tgt = make_targets(m.processor.masks([sem]), 4 * 112 // 14)
    assert len(tgt[0]["boxes"]) == 2  # two discs -> two instances
    loss_fn = Sam3Loss()

    def grads(model, autocast=False, train=True):
        model.train(train)  # eval: no dropout, for comparing gradients
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(pv, [["white disc"]])
            loss, parts = loss_fn(out.instances.raw, tgt)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, parts

    g, parts = grads(m)
    assert set(parts) >= {"ce", "presence", "bbox", "giou", "mask", "dice", "semantic", "semantic_dice"}
    assert any(n.startswith("decoder.detr_decoder") for n in g) and any(n.startswith("decoder.mask_decoder") for n in g)
    assert not any(n.startswith(("image_encoder", "text_encoder", "decoder.geometry_encoder")) for n in g)
    assert grads(m, autocast=True)[0]  # bf16 autocast trains (text prompts)
    m.apply_lora({"r": 4, "image": True, "text": True})
    g_lora, _ = grads(m, train=False)
    assert any("image_encoder" in n and "lora_B" in n for n in g_lora)
    assert any("text_encoder" in n and "lora_B" in n for n in g_lora)
    assert m.set_gradient_checkpointing(True) == {"image": True, "text": True}
    g_ckpt, _ = grads(m, train=False)
    for n, v in g_lora.items():
        torch.testing.assert_close(g_ckpt[n], v, atol=1e-5, rtol=1e-4)


def test_loss_decreases_on_a_fixed_batch(sam3_dir):
    from vlseg.families._sam3_training import Sam3Loss, make_targets, semantic_to_instances

    masks, boxes = semantic_to_instances(disc_image()[1])
    assert masks.shape[0] == 2 and np.all(boxes[:, 2:] > boxes[:, :2])
    m = vlseg.create_model("tiny-test-sam3", pretrained=sam3_dir)
    image, sem = disc_image()
    pv = m.processor([np.asarray(image)] * 2)
    tgt = make_targets(m.processor.masks([sem, np.zeros_like(sem)]), 32)  # present + absent concept
    feats = m.encode_image(pv).tokens[0].detach()
    from vlseg.features import ImageFeatures

    cached = ImageFeatures(tokens=[feats], grid=(8, 8), image_size=(112, 112))
    loss_fn = Sam3Loss()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    m.train()
    losses = []
    for _ in range(15):
        loss, _ = loss_fn(m(pv, [["white disc"], ["liver"]], image_features=cached).instances.raw, tgt)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.75 * losses[0], losses


@pytest.mark.slow
def test_finetune_script_on_shared_data(sam3_dir, tmp_path, shared_data):
    """finetune/train.py with the sam3-segmentation task (chosen from the family), frozen Perception Encoder, on
    real images: the loss on the run's own batches goes down and the checkpoint holds only trained tensors."""
    from vlseg import training as T

    out = tmp_path / "run"
    manifest = shared_data / "cvc_clinicdb" / "manifest.jsonl"
    args = ["model=tiny-test-sam3", f"pretrained={sam3_dir}", f"data=[{{manifest: {manifest}}}]",
            f"output_dir={out}", "max_steps=6", "batch_size=2", "lr=0.0003", "warmup_steps=1", "eval_every=1000",
            "eval_max_samples=1", "prompt_levels=[p1]", "eval_levels=[p1]", "negative_rate=0.25",
            "augment={hflip: 0.5}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, str(ROOT / "finetune" / "train.py"), *args], capture_output=True, text=True,
                       env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "task sam3-segmentation" in r.stdout
    keys = load_file(str(out / "last" / "model.safetensors"))
    assert keys and all(k.startswith(("decoder.detr_", "decoder.mask_decoder", "decoder.dot_product"))
                        for k in keys)
    trained = vlseg.load(out / "last")
    start = vlseg.create_model("tiny-test-sam3", pretrained=sam3_dir)
    cfg = T.load_config(None, args)
    task = T.get_task("sam3-segmentation")
    train_ds, _ = task.datasets(cfg)
    batcher = task.batcher(start, train_ds, cfg, 0, 1)
    batches = [batcher(s, "cpu") for s in range(4)]  # batches the run trained on

    def mean_loss(model):
        model.eval()
        with torch.no_grad():
            return float(np.mean([float(task.loss(model, b, None)[0]) for b in batches]))

    before, after = mean_loss(start), mean_loss(trained)
    assert after < before, (before, after)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(log) == 6


@pytest.mark.hub
def test_real_sam3_end_to_end():
    """facebook/sam3 (gated: accept the SAM License on the Hub and log in) on a real image."""
    model = vlseg.create_model("sam3")
    assert model.processor.size == 1008
    path = DATA / "kvasir_seg_sample" / "images"
    image = sorted(path.iterdir())[0] if path.is_dir() else disc_image()[0]
    pred = vlseg.predict(model, image, ["polyp", "a surgical instrument"])
    assert pred.masks.shape[0] == 2 and pred.instances is not None
    masks = vlseg.segment_video(model, [vlseg.read_image(image)[0]] * 3, ["polyp"], progress=False)
    assert masks.shape[:2] == (3, 1)


@pytest.mark.slow
def test_benchmark_script_quick(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sam3.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {c["name"] for c in data["cases"]} == {"k_prompts_1", "k_prompts_8", "video"}
    for c in data["cases"]:
        assert c["ratio"] == pytest.approx(c["reference_s"] / c["vlseg_s"], rel=1e-6)
    assert all(c["mask_agreement"] > 0.999 for c in data["cases"] if "mask_agreement" in c)
    assert {"cpu", "cpu_flags", "threads", "torch", "device"} <= set(data["env"])
    assert "| k_prompts_8 |" in r.stdout
