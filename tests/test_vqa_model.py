"""The VQA model (``vqa`` family): shapes, the ``answer`` contract, open-vocabulary answers, checkpoints, metrics,
evaluation, the ``vqa`` task's data and batches, and ``vlseg ask``. Tiny random models, offline, seconds."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vlseg
from vlseg.vqa import AnswerVocab, VQAModel, VQAOutput
from vlseg.vqa.evaluation import balanced_accuracy, evaluate, macro_f1, majority_answers, report_lines


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return vlseg.create_model("tiny-test-vqa", pretrained=False)


def _present(m: VQAModel, value: float = 10.0) -> VQAModel:
    """Force the "refers to a region" head (decoder presence head) to always say yes / no."""
    with torch.no_grad():
        m.decoder.presence_head[1].bias.fill_(value)
        m.decoder.presence_head[1].weight.zero_()
    return m


def _image(h: int = 37, w: int = 53) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    img[5:20, 8:30] = (220, 120, 120)
    return img


def synthetic_segmentation(folder, n: int = 10):
    """A manifest of n images, each with a 'grasper' (left) and a 'hook' (right, absent in every third image)."""
    rng = np.random.default_rng(1)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = []
    for i in range(n):
        img = (rng.random((48, 64, 3)) * 50).astype(np.uint8)
        g = np.zeros((48, 64), np.uint8)
        h = np.zeros((48, 64), np.uint8)
        y = int(rng.integers(4, 24))
        g[y:y + 16, 4:4 + int(rng.integers(10, 20))] = 255
        if i % 3:
            h[y:y + 10, 40:40 + int(rng.integers(6, 20))] = 255
        img[g > 0] = (220, 120, 120)
        img[h > 0] = (120, 220, 120)
        Image.fromarray(img).save(folder / "images" / f"{i}.png")
        for name, m in (("grasper", g), ("hook", h)):
            Image.fromarray(m).save(folder / "masks" / f"{i}_{name}.png")
            rows.append({"image": f"images/{i}.png", "mask": f"masks/{i}_{name}.png", "class_name": name,
                         "dataset": "synth", "subject": f"s{i // 2}", "negative": not m.any()})
    mf = folder / "manifest.jsonl"
    mf.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return mf


@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory):
    return synthetic_segmentation(tmp_path_factory.mktemp("vqa-synth"))


# ----------------------------------------------------------------------------------------------- model
def test_presets_and_family():
    assert {"biomedclip-vqa", "clip-b16-vqa", "minilm-scratch-vqa", "tiny-test-vqa"} <= set(vlseg.list_models())
    from vlseg.families import get_family

    for name in ("biomedclip-vqa", "clip-b16-vqa", "minilm-scratch-vqa", "tiny-test-vqa"):
        cfg = vlseg.get_model_config(name)
        fam = get_family(cfg.family)
        assert fam.name == "vqa" and fam.capabilities.task == "vqa"
        fam.validate(cfg)  # the presets are valid without building (no downloads)
    with pytest.raises(ValueError, match="Unknown 'vqa' family option"):
        vlseg.create_model("tiny-test-vqa", pretrained=False, family_options={"fusoin": {}})
    with pytest.raises(ValueError, match="divisible"):
        vlseg.create_model("tiny-test-vqa", pretrained=False, family_options={"fusion": {"dim": 30, "heads": 4}})
    with pytest.raises(ValueError, match="presence"):
        vlseg.create_model("tiny-test-vqa", pretrained=False, presence=False)


def test_forward_shapes_image_once_and_segment(model):
    pv = torch.randn(2, 3, 64, 64)
    calls = model.stats["image_encoder_calls"]
    out = model(pv, ["Is there any grasper?", "Where is the hook?", "How many hook regions are there?"])
    assert model.stats["image_encoder_calls"] == calls + 1  # one image pass for three questions
    assert isinstance(out, VQAOutput) and out.mode == "closed"
    a = len(model.closed_labels)
    assert out.logits.shape == (2, 3, 64, 64) and out.presence.shape == (2, 3)
    assert out.answer_logits.shape == (2, 3, a) and out.open_logits.shape == (2, 3, len(model.answer_list()))
    assert len(out.answers) == 6 and all(x in model.closed_labels for x in out.answers)
    _, probs = out.probs()
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3))
    # teacher forcing and gradients reach the fusion, both heads and the grounding decoder
    model.train()
    out = model(pv, [["q1", "q2"], ["q3", ""]], answers=["yes", "no", "grasper", "2"])
    (out.logits.mean() + out.answer_logits.mean() + out.open_logits.mean() + out.presence.mean()).backward()
    for name in ("fusion", "answer_head", "open_query", "answer_proj", "ground_pool", "decoder"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()), name
    with pytest.raises(ValueError, match="answers"):
        model(pv, ["q"], answers=["yes"])
    with pytest.raises(ValueError, match="box prompts"):
        model(pv, ["q"], boxes=object())
    model.eval()
    masks = vlseg.segment(model, _image(), ["Where is the grasper?", "Is there any hook?"])  # questions as prompts
    assert masks.shape == (2, 37, 53) and masks.dtype == bool


def test_frozen_text_is_cached_and_not_trained(model):
    model.train()
    model(torch.randn(1, 3, 64, 64), ["Is there any grasper?"], answers=["yes"])
    calls = model.stats["text_encoder_calls"]
    model(torch.randn(1, 3, 64, 64), ["Is there any grasper?"], answers=["yes"])
    assert model.stats["text_encoder_calls"] == calls  # question and answers: cached token states, in training too
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not any(p.requires_grad for p in model.image_encoder.parameters())


# ----------------------------------------------------------------------------------------------- answer()
def test_answer_contract(model):
    _present(model, 10.0)
    img = _image()
    r = vlseg.answer(model, img, "Is there any grasper?")
    assert set(r) >= {"answer", "score", "top_k", "mask", "region_score", "box", "question"}
    assert isinstance(r["answer"], str) and r["answer"] == r["top_k"][0][0] and r["score"] == r["top_k"][0][1]
    assert len(r["top_k"]) == 5 and all(isinstance(a, str) and 0 <= p <= 1 for a, p in r["top_k"])
    assert [p for _, p in r["top_k"]] == sorted((p for _, p in r["top_k"]), reverse=True)
    assert r["mask"].shape == (37, 53) and r["mask"].dtype == bool and r["region_score"] > 0.99
    calls = model.stats["image_encoder_calls"]
    many = vlseg.answer(model, img, ["Is there any grasper?", "Where is the hook?"], top_k=2)
    assert model.stats["image_encoder_calls"] == calls + 1  # one image pass for both questions
    assert isinstance(many, list) and len(many) == 2 and len(many[0]["top_k"]) == 2
    assert many[0]["answer"] == r["answer"]
    imgs = vlseg.answer(model, [img, _image(20, 30)], "Is there any grasper?")
    assert isinstance(imgs, list) and imgs[1]["mask"].shape == (20, 30)
    grid = vlseg.answer(model, [img, img], ["a?", "b?", "c?"])
    assert [len(g) for g in grid] == [3, 3]
    # the answer refers to no region -> mask None
    _present(model, -10.0)
    r = vlseg.answer(model, img, "Is there any hook?")
    assert r["mask"] is None and r["box"] is None and r["region_score"] < 0.01
    assert vlseg.answer(model, img, "Is there any hook?", region_threshold=None)["mask"].shape == (37, 53)


def test_answer_errors(model, tiny):
    with pytest.raises(TypeError, match="VQA model"):
        vlseg.answer(tiny, _image(), "Is there any grasper?")
    with pytest.raises(ValueError, match="empty"):
        vlseg.answer(model, _image(), "  ")
    with pytest.raises(ValueError, match="No question"):
        vlseg.answer(model, _image(), [])
    with pytest.raises(ValueError, match="mode"):
        vlseg.answer(model, _image(), "q?", mode="both")


def test_box_from_mask(model):
    _present(model, 10.0)
    with torch.no_grad():  # the grounding map: foreground everywhere
        model.decoder.upsample[-1].bias.fill_(20.0)
    r = vlseg.answer(model, _image(), "Where is the grasper?")
    assert r["mask"].all() and r["box"] == (0.0, 0.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------- open vocabulary
def test_open_vocabulary_answers_without_retraining(model, tmp_path):
    head = {k: v.clone() for k, v in model.answer_head.state_dict().items()}
    img = _image()
    before = vlseg.answer(model, img, "Which instrument is this?", top_k=100)
    assert before["answer"] in model.vocab.answers
    added = model.add_answers(["Clip applier", "yes", "irrigator"])
    assert added == ["clip applier", "irrigator"]  # normalised; known answers are not added twice
    assert model.answer_list()[-2:] == ["clip applier", "irrigator"]
    r = vlseg.answer(model, img, "Which instrument is this?", top_k=100)
    labels = [a for a, _ in r["top_k"]]
    assert {"clip applier", "irrigator"} <= set(labels) and len(labels) == len(model.answer_list())
    assert abs(sum(p for _, p in r["top_k"]) - 1) < 1e-4
    # candidates given per call: only they are scored
    r = vlseg.answer(model, img, "Which instrument is this?", candidates=["grasper", "Bipolar forceps"])
    assert {a for a, _ in r["top_k"]} == {"grasper", "bipolar forceps"}
    # the closed head is untouched, and the added answers travel with the checkpoint
    assert all(torch.equal(v, model.answer_head.state_dict()[k]) for k, v in head.items())
    back = vlseg.load(model.save_pretrained(tmp_path / "ck"))
    assert back.answer_list() == model.answer_list()
    ra, rb = (vlseg.answer(m, img, "Which instrument is this?", top_k=3)["top_k"] for m in (model, back))
    assert [a for a, _ in ra] == [a for a, _ in rb] and np.allclose([p for _, p in ra], [p for _, p in rb], atol=1e-5)
    # closed mode still answers from the vocabulary only
    r = vlseg.answer(model, img, "Which instrument is this?", mode="closed", top_k=100)
    assert not {"clip applier", "irrigator"} & {a for a, _ in r["top_k"]}


def test_set_vocab_keeps_known_rows_and_unknown_policy(model):
    w = model.answer_head[-1].weight.detach().clone()
    old = model.closed_labels
    vocab = AnswerVocab(name="t", answers=("no", "yes", "grasper"), unknown_policy="unknown")
    assert model.set_vocab(vocab) and not model.set_vocab(vocab)
    assert model.closed_labels == ["no", "yes", "grasper", "<unk>"]
    new = model.answer_head[-1].weight
    assert torch.equal(new[0], w[old.index("no")]) and torch.equal(new[1], w[old.index("yes")])
    out = model(torch.randn(1, 3, 64, 64), ["q?"])
    assert out.answer_logits.shape[-1] == 4
    assert model.config.family_options["vocab"]["answers"] == ["no", "yes", "grasper"]
    assert model.config.family_options["vocab"]["unknown_policy"] == "unknown"


def test_checkpoint_round_trip_is_self_contained(model, tmp_path):
    model.set_vocab(AnswerVocab(name="mine", answers=("yes", "no", "liver", "aorta")))
    folder = model.save_pretrained(tmp_path / "ck")
    saved = json.loads((tmp_path / "ck" / "config.json").read_text())
    text = json.dumps(saved)
    assert '"liver"' in text and '"aorta"' in text  # the vocabulary lives in the checkpoint
    back = vlseg.load(folder)
    assert isinstance(back, VQAModel) and back.closed_labels == ["yes", "no", "liver", "aorta"]
    pv = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(pv, ["Is there any liver?"]), back(pv, ["Is there any liver?"])
    assert torch.allclose(a.answer_logits, b.answer_logits, atol=1e-6)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)


# ----------------------------------------------------------------------------------------------- metrics, evaluate
def test_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = ["yes", "no", "1", "2", "liver"]
    for _ in range(20):
        n = int(rng.integers(1, 40))
        t = [labels[i] for i in rng.integers(0, 5, n)]
        p = [labels[i] for i in rng.integers(0, 5, n)]
        assert macro_f1(t, p) == pytest.approx(sk.f1_score(t, p, average="macro", zero_division=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert balanced_accuracy(t, p) == pytest.approx(sk.balanced_accuracy_score(t, p))
    assert majority_answers(["no", "yes", "no", "1"], ["e", "e", "e", "c"]) == ("no", {"e": "no", "c": "1"})


def test_evaluate_reports_baselines_per_type(model, synth_manifest):
    from vlseg.data import from_manifest
    from vlseg.vqa import from_segmentation

    ds = from_segmentation(from_manifest(synth_manifest), seed=0, questions_per_image=6)
    s = evaluate(model, ds, train_answers=ds, max_samples=30, keep_predictions=True)
    assert s["n"] == 30 and s["majority_source"] == "train"
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "dice", "iou", "region_accuracy", "box_iou"):
        assert key in s["all"]
    assert set(s["per_type"]) <= set(ds.types()) and len(s["per_type"]) >= 3
    assert {"majority", "type_majority", "question_blind"} <= set(s["baselines"])
    assert set(s["heads"]) == {"closed", "open"} and len(s["predictions"]) == 30
    lines = report_lines(s)
    assert lines[1].split()[:3] == ["type", "n", "acc"] and any(x.startswith("all") for x in lines)
    json.dumps(s)  # JSON-serialisable


# ----------------------------------------------------------------------------------------------- task data
def test_task_datasets_split_vocab_and_batches(model, synth_manifest, tmp_path):
    from vlseg.training import get_task, load_config

    cfg = load_config(None, [f"data=[{{manifest: {synth_manifest}, qa: {{infer_absent: true}}}}]", "batch_size=3",
                             "task=vqa", "best_metric=accuracy", "task_options={questions_per_image: 2}",
                             "augment=null"])
    task = get_task("vqa")
    train, val = task.datasets(cfg)
    assert len(train) and len(val)
    tk = {train.image_key(i) for i in range(len(train))}
    vk = {val.image_key(i) for i in range(len(val))}
    assert not tk & vk  # no image on both sides
    assert {"grasper", "hook", "yes", "no"} <= set(train.vocab.answers)
    b = task.batcher(model, train, cfg, 0, 1)
    assert model.closed_labels[:len(train.vocab.answers)] == list(train.vocab.answers)
    batch = b(5, "cpu")
    assert batch.pixel_values.shape == (3, 3, 64, 64) and len(batch.keys) == 3
    assert [len(q) for q in batch.inputs["questions"]] == [2, 2, 2] and batch.inputs["targets"].shape == (3, 2, 64, 64)
    again = b(5, "cpu")
    assert again.inputs["questions"] == batch.inputs["questions"]
    assert torch.equal(again.pixel_values, batch.pixel_values)
    model.train()
    loss, parts = task.loss(model, batch, None)
    loss.backward()
    assert torch.isfinite(loss) and {"answer_ce", "open_ce", "dice", "presence"} <= set(parts)
    ev = task.evaluate(model, val, cfg)
    assert 0 <= ev.score <= 1 and "blind_accuracy" in ev.headline
    with pytest.raises(ValueError, match="unknown vqa task_options"):
        task.datasets(load_config(None, [f"data=[{{manifest: {synth_manifest}}}]", "task_options={k: 1}",
                                         "best_metric=accuracy"]))
    with pytest.raises(ValueError, match="not a vqa metric"):
        task.datasets(load_config(None, [f"data=[{{manifest: {synth_manifest}}}]", "best_metric=hd95"]))
    with pytest.raises(ValueError, match="needs a VQA model"):
        task.batcher(vlseg.create_model("tiny-test", pretrained=False), train, cfg, 0, 1)


def test_task_reads_published_jsonl(model, tmp_path):
    from vlseg.training import get_task, load_config

    rows = []
    for i in range(6):
        img = np.full((30, 40, 3), 40 * i, np.uint8)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "What is the phase?", "answer": ["dissection", "clipping"][i % 2],
                     "box": [2, 3, 20, 25] if i % 2 else None})
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps({k: v for k, v in r.items() if v is not None})
                                                 for r in rows))
    cfg = load_config(None, [f"data=[{{vqa: {tmp_path / 'qa.jsonl'}, format: jsonl}}]", "batch_size=2",
                             "best_metric=accuracy", "augment=null"])
    task = get_task("vqa")
    train, val = task.datasets(cfg)
    assert len(train) + len(val) == 6 and {"dissection", "clipping"} <= set(train.vocab.answers)
    batch = task.batcher(model, train, cfg, 0, 1)(0, "cpu")
    g = batch.inputs["grounded"].tolist()
    assert len(g) == 8  # only rows with a box say what the answer refers to
    loss, _ = task.loss(model, batch, None)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_ask(model, tmp_path, capsys):
    from vlseg.cli import main

    ck = _present(model, 10.0).save_pretrained(tmp_path / "ck")
    Image.fromarray(_image()).save(tmp_path / "frame.png")
    out = tmp_path / "out"
    assert main(["ask", str(tmp_path / "frame.png"), "-q", "Is there any grasper?", "-q", "Where is the hook?",
                 "--model", ck, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("Q: ") == 2 and text.count("A: ") == 2 and "top:" in text
    assert sorted(p.name for p in out.iterdir()) == ["frame__answers_overlay.png", "frame__q1.png", "frame__q2.png"]
    assert Image.open(out / "frame__q1.png").size == (53, 37)
    assert main(["ask", str(tmp_path / "frame.png"), "-q", "Is there any grasper?", "-m", ck, "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "frame.png"), "-q", "Is there any grasper?", "-m", ck, "--json",
                 "-c", "yes", "-c", "no"]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["answer"] in ("yes", "no") and rec["mask"] is None and len(rec["top_k"]) == 2
    seg = vlseg.create_model("tiny-test", pretrained=False).save_pretrained(tmp_path / "seg")
    assert main(["ask", str(tmp_path / "frame.png"), "-q", "Is there any grasper?", "-m", seg]) == 2
    assert "VQA model" in capsys.readouterr().err
