"""Published VQA loaders (vlseg.vqa.from_published) on small trees laid out like the releases, JSONL manifests, and
question generation from segmentation datasets (from_segmentation), on tmp_path fixtures and on ../shared/data."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlseg.data import from_manifest
from vlseg.vqa import (
    SPLITS,
    FileVQADataset,
    VQADataError,
    VQADataWarning,
    from_published,
    from_segmentation,
)


def _png(path: Path, w: int = 8, h: int = 6, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = value
    Image.fromarray(arr).save(path)
    return path


def _txt(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _endovis(root: Path) -> Path:
    """seq_1 (val) with 2 frames, seq_2 (train) with 1 frame; spelling variants of one answer."""
    _txt(root / "seq_1/vqa/Classification/frame000_QA.txt", "What organ is being operated?|kidney",
         "What is the state of bipolar_forceps?|Tissue_Manipulation", "Where is bipolar_forceps located?|left-top")
    _txt(root / "seq_1/vqa/Classification/frame001_QA.txt", "What is the state of prograsp_forceps?|Tissue Manipulation",
         "", "What is the state of suction?&What is the state of clip_applier?|Suction&Idle")
    _txt(root / "seq_2/vqa/Classification/frame000_QA.txt", "What is the state of stapler?|tissue manipulation")
    for seq, frame, v in ((1, 0, 10), (1, 1, 20), (2, 0, 30)):
        _png(root / f"seq_{seq}/left_frames/frame{frame:03d}.png", value=v)
    return root


def test_endovis18_vqa_layout_splits_and_spellings(tmp_path):
    root = _endovis(tmp_path / "EndoVis-18-VQA")
    ds = from_published(root, "endovis18-vqa")
    assert isinstance(ds, FileVQADataset) and len(ds) == 7 and ds.report.files == 3
    assert {r["image"] for r in ds.records} >= {str(root / "seq_1/left_frames/frame000.png")}
    tm = [r for r in ds.records if r["raw_answer"].lower().replace("_", " ") == "tissue manipulation"]
    assert len(tm) == 3 and {r["answer"] for r in tm} == {"tissue manipulation"} and {r["answer_index"] for r in tm} == {4}
    assert Counter(ds.types()) == {"tool state": 5, "organ": 1, "location": 1}
    s = ds[0]
    assert s.image.shape == (6, 8, 3) and s.image[0, 0, 0] == 10 and s.question == "What organ is being operated?"
    assert (s.answer, s.answer_index, s.meta["sequence"], s.meta["frame"]) == ("kidney", 0, "1", "frame000")
    both = {r["question"]: r["answer"] for r in ds.records
            if r["meta"]["line"] == 3 and r["meta"]["frame"] == "frame001"}
    assert both == {"What is the state of suction?": "suction", "What is the state of clip_applier?": "idle"}
    with pytest.warns(VQADataWarning, match="folders of the split not found"):
        val = from_published(root, "endovis18-vqa", split="val")
    with pytest.warns(VQADataWarning, match="10 folders of the split not found"):
        train = from_published(root, "endovis18-vqa", split="train")
    assert {r["meta"]["sequence"] for r in val.records} == {"1"} and len(val) == 6
    assert len(train) == 1 and train.report.missing_sequences  # the other train sequences are not in this tree
    with pytest.raises(ValueError, match="standard splits"):
        from_published(root, "endovis18-vqa", split="test")


def test_malformed_lines_name_file_and_line(tmp_path):
    root = _endovis(tmp_path / "ev")
    bad = _txt(root / "seq_1/vqa/Classification/frame002_QA.txt", "What organ is being operated?|kidney",
               "What is the state of suction?")
    with pytest.raises(VQADataError, match=rf"{bad.name}:2: malformed line"):
        from_published(root, "endovis18-vqa")
    _txt(bad, "q1&q2|a1&a2&a3")
    with pytest.raises(VQADataError, match=rf"{bad.name}:1: 2 questions .* 3 answers"):
        from_published(root, "endovis18-vqa")


def test_missing_frames_are_reported_not_silent(tmp_path):
    root = _endovis(tmp_path / "ev")
    missing = root / "seq_1/left_frames/frame001.png"
    missing.unlink()
    with pytest.warns(VQADataWarning, match="1 missing frame images, 3 questions dropped"):
        ds = from_published(root, "endovis18-vqa")
    assert len(ds) == 4 and ds.report.missing_frames == {str(missing): 3} and ds.report.samples == 4
    assert "frame001.png" in ds.report.summary()
    with pytest.raises(VQADataError, match="frame001.png"):
        from_published(root, "endovis18-vqa", on_missing_frame="error")


def test_unknown_answers_under_each_policy(tmp_path):
    root = _endovis(tmp_path / "ev")
    odd = _txt(root / "seq_2/vqa/Classification/frame000_QA.txt", "What is the state of stapler?|Banana_Split",
               "What organ is being operated?|kidney")
    with pytest.raises(VQADataError, match=rf"'banana split' x1 \(.*{odd.name}:1\)"):
        from_published(root, "endovis18-vqa")  # packaged policy: "error"
    with pytest.warns(VQADataWarning, match="answers outside the vocabulary"):
        unk = from_published(root, "endovis18-vqa", unknown_policy="unknown")
    row = next(r for r in unk.records if r["answer"] == "banana split")
    assert row["answer_index"] == 18 == unk.vocab.unk_index and unk.vocab.answer(18) == "<unk>" and len(unk) == 8
    with pytest.warns(VQADataWarning, match="1 questions dropped"):
        skip = from_published(root, "endovis18-vqa", unknown_policy="skip")
    assert len(skip) == 7 and skip.report.skipped_unknown == 1 and skip.report.unknown_answers == {"banana split": 1}
    assert skip.report.unknown_where["banana split"] == [f"{odd}:1"]


def test_endovis18_vqla_boxes_are_normalised_edges(tmp_path):
    root = tmp_path / "EndoVis-18-VQLA"
    _txt(root / "seq_5/vqla/label/frame000_QA.txt", "Where is bipolar_forceps located?|left-top|1,1,4,3",
         "What organ is being operated?|kidney|1, 1, 8, 6")
    _png(root / "seq_5/left_frames/frame000.png")
    ds = from_published(root, "endovis18-vqla", split="val", warn=False)
    a, b = ds[0], ds[1]
    assert a.box == (0.0, 0.0, 0.5, 0.5) and a.meta["raw_box"] == [1, 1, 4, 3] and a.answer == "left top"
    assert b.box == (0.0, 0.0, 1.0, 1.0) and b.type == "organ"
    _txt(root / "seq_5/vqla/label/frame000_QA.txt", "Where is it?|left-top|4,1,1,3")
    with pytest.raises(VQADataError, match="frame000_QA.txt:1: malformed box"):
        from_published(root, "endovis18-vqla")
    _txt(root / "seq_5/vqla/label/frame000_QA.txt", "Where is it?|left-top")
    with pytest.raises(VQADataError, match="frame000_QA.txt:1: malformed line"):
        from_published(root, "endovis18-vqla")
    ev17 = tmp_path / "EndoVis-17-VQLA"
    _txt(ev17 / "vqla/label/seq_1_frame000.txt", "What organ is being operated?|kidney|1,1,2,2")
    _png(ev17 / "left_frames/seq_1_frame000.png")
    assert len(from_published(ev17, "endovis18-vqla")) == 1
    with pytest.raises(VQADataError, match="no standard split"):
        from_published(ev17, "endovis18-vqla", split="val")


def test_cholec80_vqa_layout_split_and_frame_step(tmp_path):
    root = tmp_path / "Cholec80-VQA"
    _txt(root / "Classification/5/100_QA.txt", "What is the phase?|calot triangle dissection",
         "How many tools are operating?|2", "Is grasper used in calot triangle dissection?|yes")
    _txt(root / "Classification/5/150_QA.txt", "What is the phase?|CalotTriangleDissection")
    _txt(root / "Classification/1/0_QA.txt", "What is the phase?|preparation")
    for video, frame in ((5, 100), (5, 150), (1, 0)):
        _png(root / f"cropped_image/{video}/{frame}.png")
    ds = from_published(root, "cholec80-vqa")
    assert len(ds) == 5 and sorted(ds.types().items()) == [("counting", 1), ("existence", 1), ("phase", 3)]
    assert {r["answer_index"] for r in ds.records if r["type"] == "phase"} == {1, 11}  # alias -> same answer
    with pytest.warns(VQADataWarning, match="folders of the split not found"):
        val = from_published(root, "cholec80-vqa", split="val")
    assert {r["meta"]["video"] for r in val.records} == {"5"}
    assert "5" not in {str(v) for v in SPLITS["cholec80-vqa"]["train"]}
    stepped = from_published(root, "cholec80-vqa", frame_step=100)
    assert sorted(r["meta"]["frame"] for r in stepped.records) == [0, 100, 100, 100]


def test_psi_ava_vqa_layout(tmp_path):
    root = tmp_path / "PSI-AVA-VQA"
    _txt(root / "Train/C1_location.txt", "CASE001/00001.jpg|Where is the bipolar forceps?|top left")
    _txt(root / "Train/C3_phase.txt", "CASE001/00001.jpg|What is the phase?|Vesículas_Seminales")
    _txt(root / "Val/C4_step.txt", "CASE002/00007.jpg|What is the step?|Corte")
    _png(root / "keyframes/CASE001/00001.jpg")
    _png(root / "keyframes/CASE002/00007.jpg")
    ds = from_published(root, "psi-ava-vqa")
    assert [r["type"] for r in ds.records] == ["location", "phase", "step"]
    assert ds[1].answer == "vesículas seminales" and ds[0].answer_index == 0
    assert len(from_published(root, "psi-ava-vqa", split="val")) == 1
    _txt(root / "Val/C4_step.txt", "CASE002/00007.jpg|What is the step?")
    with pytest.raises(VQADataError, match="C4_step.txt:1: malformed line, expected 'keyframe|question|answer'"):
        from_published(root, "psi-ava-vqa", split="val")


def test_ssg_vqa_layout_header_and_line_shapes(tmp_path):
    root = tmp_path / "ssg"
    _txt(root / "qa_txt/VID01/262.txt",
         "Which anatomical structures are present?|liver, omentum, cystic_plate, gallbladder",
         "Which tools are present?|hook",
         "What is the action being performed on cystic_duct?|dissect",
         "What anatomy is at the top-mid of the frame ?|cystic_plate|[157.0, 60.0]",
         "How many top-mid instruments are there?|1|zero_hop.json|count|NA",
         "There is a top-mid hook instrument; are there any top-mid hook objects within it?|False|one_hop.json|exist|relate_spatial")
    _png(tmp_path / "CholecT45/VID01/000262.png")
    ds = from_published(root, "ssg-vqa", split="val", images=tmp_path / "CholecT45", warn=False)
    assert len(ds) == 4 and ds.report.lines == 4
    assert [r["type"] for r in ds.records] == ["action", "location", "counting", "existence"]
    assert ds.records[1]["meta"]["point"] == (157.0, 60.0) and ds.records[2]["meta"]["raw_type"] == "count"
    assert ds.records[3]["answer"] == "false" and ds.records[3]["answer_index"] == 11
    assert ds[0].meta["header"][1] == "Which tools are present?|hook"
    with pytest.raises(VQADataError, match=r"none of the split's videos \['VID22'"):
        from_published(root, "ssg-vqa", split="test", images=tmp_path / "CholecT45")
    with pytest.warns(VQADataWarning, match="000262.png"):
        assert len(from_published(root, "ssg-vqa")) == 0  # frames are not in the release: reported, not hidden
    _txt(root / "qa_txt/VID01/262.txt", "h1|a", "h2|b", "What anatomy is at the top-mid?|liver|[1.0]")
    with pytest.raises(VQADataError, match=r"262.txt:3: malformed point"):
        from_published(root, "ssg-vqa", images=tmp_path / "CholecT45")


def test_jsonl_rows_masks_boxes_and_splits(tmp_path):
    img = _png(tmp_path / "img/a.png", w=10, h=4)
    mask = np.zeros((4, 10), np.uint8)
    mask[1:3, 2:5] = 255
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    rows = [{"image": "img/a.png", "question": "Where is the polyp?", "answer": "Upper_Left", "mask": "a_mask.png",
             "box": [2, 1, 5, 3], "type": "location", "split": "train"},
            {"image": "img/a.png", "question": "Is there a polyp?", "answer": "yes", "box_normalized": [0, 0, 1, 1],
             "split": "val"}]
    path = tmp_path / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = from_published(path, "jsonl")
    s = ds[0]
    assert s.answer == "upper left" and s.answer_index is None and s.mask.sum() == 6 and s.box == (0.2, 0.25, 0.5, 0.75)
    assert ds[1].box == (0.0, 0.0, 1.0, 1.0) and str(img) == ds.records[0]["image"]
    assert len(from_published(path, "jsonl", split="val")) == 1
    assert from_published(path, "jsonl", vocab="engine")[0].answer_index == 13
    path.write_text(json.dumps({"image": "img/a.png", "question": "q"}) + "\n")
    with pytest.raises(VQADataError, match=r"vqa.jsonl:1: missing \['answer'\]"):
        from_published(path, "jsonl")
    path.write_text(json.dumps({"image": "img/a.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(VQADataError, match="no row has a 'split' field"):
        from_published(path, "jsonl", split="train")
    with pytest.raises(ValueError, match="unknown VQA format"):
        from_published(path, "vqa-rad")


# ---- from_segmentation ----------------------------------------------------------------------------------------------
def _seg_manifest(tmp_path: Path) -> Path:
    """Two images; grasper (2 blobs) and hook; 'surgical instrument' = their union; a negative row."""
    rows = []
    for k in range(2):
        _png(tmp_path / f"img{k}.png", w=40, h=30, value=50 * k)
        g, h = np.zeros((30, 40), np.uint8), np.zeros((30, 40), np.uint8)
        g[2:10, 2:10] = 255
        g[20:28, 2:10] = 255
        if k == 0:
            h[5:15, 25:38] = 255
        masks = {"grasper": g, "hook": h, "surgical instrument": np.maximum(g, h)}
        for name, m in masks.items():
            Image.fromarray(m).save(tmp_path / f"img{k}_{name}.png")
            row = {"image": f"img{k}.png", "mask": f"img{k}_{name}.png", "class_name": name, "dataset": "toy"}
            if name == "hook" and k == 1:
                row["negative"] = True
            if name == "surgical instrument":
                row["derived_from"] = ["grasper", "hook"] if k == 0 else ["grasper"]
            rows.append(row)
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_from_segmentation_groups_images_and_respects_unions(tmp_path):
    seg = from_manifest(_seg_manifest(tmp_path))
    ds = from_segmentation(seg, seed=1, questions_per_image=30)
    assert len({r["meta"]["image_key"] for r in ds.records}) == 2 and len(ds.types()) >= 4
    for r in ds.records:
        classes = set(r["meta"]["classes"])
        if r["type"] in ("relative position", "size comparison"):
            assert not ("surgical instrument" in classes and classes & {"grasper", "hook"}), r["question"]
    hook_img1 = [r for r in ds.records if r["meta"]["image"].endswith("img1.png") and r["meta"]["classes"] == ("hook",)]
    assert hook_img1 and all(r["answer"] in ("no", "0") for r in hook_img1)
    i = next(i for i, r in enumerate(ds.records) if r["type"] == "counting" and r["meta"]["classes"] == ("grasper",))
    s = ds[i]
    assert s.answer == "2" and s.mask.sum() == 128 and s.image.shape == (30, 40, 3)
    assert s.answer_index == ds.vocab.index("2")
    again = from_segmentation(from_manifest(_seg_manifest(tmp_path)), seed=1, questions_per_image=30)
    assert [r["question"] for r in again.records] == [r["question"] for r in ds.records]
    other = from_segmentation(seg, seed=2, questions_per_image=30)
    assert [r["question"] for r in other.records] != [r["question"] for r in ds.records]


def _seg(shared_data, name: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VQADataWarning)
        return from_segmentation(from_manifest(shared_data / name / "manifest.jsonl"), seed=0, **kw)


def _check_truth(ds, n: int = 40) -> None:
    for i in range(0, len(ds), max(1, len(ds) // n)):
        s = ds[i]
        assert (s.mask is None) == (s.answer in ("no", "0") and s.type in ("existence", "counting"))
        if s.mask is not None:
            assert s.mask.shape == s.image.shape[:2] and s.mask.any()


def test_from_segmentation_multiclass_shared_data(shared_data):
    em = _seg(shared_data, "epfl_em_multiclass", infer_absent=True)
    ct = _seg(shared_data, "samed2d_demo_ct")
    cholec = _seg(shared_data, "cholec_instance_seg_sample")
    for ds, images in ((em, 27), (ct, 2), (cholec, 7)):
        assert len({r["meta"]["image_key"] for r in ds.records}) == images
        assert len(ds.types()) >= 5, ds.types()
        _check_truth(ds)
    assert "no" in em.answers()  # myelinated axon has no row in some slices: absent
    for r in cholec.records:
        classes = set(r["meta"]["classes"])
        if r["type"] in ("relative position", "size comparison"):
            assert not ("surgical instrument" in classes and classes & {"grasper", "hook"})
    frame0 = [r for r in cholec.records if r["meta"]["image"].endswith("t80_VID03_000000.jpg")]
    assert frame0 and all(r["answer"] in ("no", "0") for r in frame0)  # every tool row of frame 0 is negative


def test_from_segmentation_single_class_shared_data(shared_data):
    ds = _seg(shared_data, "kvasir_seg_sample", absent_pool=["surgical instrument", "liver"])
    assert {"existence", "counting", "location"} <= set(ds.types())
    exist = Counter(r["answer"] for r in ds.records if r["type"] == "existence")
    assert exist["yes"] and exist["no"]
    _check_truth(ds)
    with pytest.warns(VQADataWarning, match="all .* existence answers are 'yes'"):
        from_segmentation(from_manifest(shared_data / "kvasir_seg_sample" / "manifest.jsonl"), types=["existence"])
