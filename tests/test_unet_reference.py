"""benchmarks/unet_reference.py: the image-only U-Net reference trains on the main job's single-class training sets,
scores the same validation images as ``vlseg evaluate``, and puts vlseg's Dice beside it as a ratio."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("segmentation_models_pytorch")


def _module():
    spec = importlib.util.spec_from_file_location("unet_reference", ROOT / "benchmarks" / "unet_reference.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["unet_reference"] = mod
    spec.loader.exec_module(mod)
    return mod


def _per_image(path, rows):
    with open(path / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "dataset", "level", "dice"])
        w.writeheader()
        w.writerows(rows)


def test_vlseg_dice_reads_the_first_level_per_dataset(tmp_path):
    _per_image(tmp_path, [{"image": "a", "dataset": "busi", "level": "p1", "dice": 0.2},
                          {"image": "a", "dataset": "busi", "level": "p6", "dice": 0.9},
                          {"image": "b", "dataset": "busi", "level": "p1", "dice": 0.6},
                          {"image": "c", "dataset": "ph2", "level": "p1", "dice": 0.8}])
    got = _module().vlseg_dice(tmp_path)
    assert got == {"busi": {"dice": pytest.approx(0.4), "n": 2, "level": "p1"},
                   "ph2": {"dice": pytest.approx(0.8), "n": 1, "level": "p1"}}


def test_loss_is_the_main_jobs_without_presence():
    """The reference is weighed by vlseg's own SegmentationLoss with the config's Dice / BCE weights, presence off."""
    import torch
    from torch.nn import functional as F

    m = _module()
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    loss = m.reference_loss({"dice_weight": 1.0, "bce_weight": 1.0, "presence_weight": 0.5})
    assert loss.w["presence"] == 0.0
    (good, _), (bad, _) = loss(20 * (2 * target - 1), target), loss(-20 * (2 * target - 1), target)
    assert float(good) < 0.05 and float(bad) > 10
    logits = torch.randn(2, 1, 16, 16)
    p = torch.sigmoid(logits)
    soft = 1 - (2 * (p * target).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    total, parts = m.reference_loss({"dice_weight": 2.0, "bce_weight": 1.0})(logits, target)
    assert set(parts) == {"dice", "bce"}
    torch.testing.assert_close(total, 2 * soft.mean() + F.binary_cross_entropy_with_logits(logits, target))


def test_learning_rate_warms_up_then_follows_the_clock_to_zero():
    m = _module()
    assert [m.lr_at(s, 4, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert m.lr_at(10, 4, 0.0) == pytest.approx(1.0)
    assert m.lr_at(10, 4, 0.5) == pytest.approx(0.5)
    assert m.lr_at(10, 4, 1.0) == pytest.approx(0.0) and m.lr_at(10, 4, 1.3) == pytest.approx(0.0)
    late = [m.lr_at(10, 4, p) for p in np.linspace(0, 1, 11)]
    assert all(a > b for a, b in zip(late, late[1:]))  # the step count does not matter after the warm-up, time does
    assert m.lr_at(10, 4, 0.5) == m.lr_at(500, 4, 0.5)


def test_training_uses_the_whole_budget():
    """A step count planned from the first (slow) steps ended runs ~10% early; the clock now ends them."""
    m = _module()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    masks = [rng.random((32, 32)) > 0.5 for _ in range(6)]
    budget = 0.05  # minutes
    _, log = m.train_reference(images, masks, np.ones(6), budget, None, batch_size=2, progress=False)
    assert log["steps"] > 4
    # exact, whatever the machine's speed: steps start until the budget is spent, none after it
    assert log["last_start_s"] < budget * 60 <= log["train_s"]
    assert log["train_s"] < budget * 60 + max(5.0, 10 * log["train_s"] / log["steps"])  # no runaway


@pytest.mark.slow
def test_reference_on_the_shared_data_beside_vlseg(shared_data, tmp_path):
    """A few seconds of training at 64 px: only the single-class sets are trained and scored, every validation row
    of them is scored (the normal scans too), and the ratio column is vlseg's Dice over the U-Net's."""
    m = _module()
    evald = tmp_path / "eval"
    evald.mkdir()
    _per_image(evald, [{"image": "a", "dataset": "busi", "level": "p1", "dice": 0.5},
                       {"image": "b", "dataset": "ph2", "level": "p1", "dice": 0.7}])
    out = tmp_path / "out"
    r = m.main(["--minutes", "0.05", "--image-size", "64", "--max-train", "24", "--out", str(out),
                "--against", str(evald), "--threads", "1"])
    per = r["per_dataset"]
    assert {"busi", "ph2", "cvc_clinicdb", "drive", "chase_db1", "isbi2012_em"} <= set(per)
    assert not {"epfl_em_multiclass", "samed2d_demo_ct", "cholec_instance_seg_sample"} & set(per)  # multi-class
    assert per["busi"]["n"] == 40 and per["ph2"]["n"] == 28  # the validation split `vlseg evaluate` scores
    assert all(0.0 <= v["dice"] <= 1.0 for v in per.values())
    for d, theirs in (("busi", 0.5), ("ph2", 0.7)):
        assert per[d]["vlseg_dice"] == theirs
        assert per[d]["ratio"] == (pytest.approx(theirs / per[d]["dice"]) if per[d]["dice"] > 0 else None)
    assert "ratio" not in per["drive"]  # no vlseg row for it in the file given
    saved = json.loads((out / "unet_reference.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert saved["steps"] >= 2 and saved["train_images"] == 24 and "machine_line" in saved
    assert (out / "curve.png").stat().st_size > 1000
    assert np.isfinite(saved["step_s"])
