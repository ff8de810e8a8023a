import math

import numpy as np
import pytest
import torch

from vlseg import metrics as M
from vlseg.losses import DiceLoss, SegmentationLoss, balanced_bce


def sq(y0, x0, y1, x1, shape=(20, 20)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_dice_iou_by_hand():
    a, b = sq(5, 5, 10, 10), sq(5, 7, 10, 12)  # 25 px each, 15 shared
    assert M.dice(a, b) == pytest.approx(2 * 15 / 50)
    assert M.iou(a, b) == pytest.approx(15 / 35)
    assert M.dice(a, a) == 1.0


def test_hd95_by_hand():
    a = sq(5, 5, 10, 10)
    b = sq(5, 8, 10, 13)  # shifted by 3 columns: every boundary point of one is within 3 of the other
    assert M.hd95(a, b) == pytest.approx(3.0)
    assert M.hd95(a, b, spacing=(1.0, 0.5)) == pytest.approx(1.5)  # columns are 0.5 mm apart
    assert M.hd95(a, a) == 0.0


def test_empty_cases():
    e = np.zeros((20, 20), bool)
    a = sq(5, 5, 10, 10)
    assert M.all_metrics(e, e) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    for pred, target in ((a, e), (e, a)):
        r = M.all_metrics(pred, target)
        assert r["dice"] == 0.0 and r["iou"] == 0.0 and r["nsd"] == 0.0
        assert r["hd95"] == pytest.approx(np.hypot(20, 20))


def test_nsd_tolerance():
    a, b = sq(5, 5, 15, 15), sq(5, 8, 15, 18)
    assert M.nsd(a, b, tau=3.0) == pytest.approx(1.0)
    assert M.nsd(a, b, tau=1.0) < 1.0


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ"):
        M.dice(np.zeros((3, 3)), np.zeros((4, 4)))


def test_aggregate():
    rows = [{"dataset": "a", "dice": 1.0, "iou": 1.0}, {"dataset": "b", "dice": 0.0, "iou": 0.0},
            {"dataset": "b", "dice": 0.5, "iou": 0.5}]
    agg = M.aggregate(rows, "dataset", keys=("dice", "iou"))
    assert agg["all"]["dice"] == pytest.approx(0.5) and agg["b"]["dice"] == pytest.approx(0.25) and agg["b"]["n"] == 2


def test_losses():
    t = torch.zeros(2, 1, 8, 8)
    t[0, 0, 2:6, 2:6] = 1
    perfect = (t * 2 - 1) * 50
    assert DiceLoss()(perfect, t) < 1e-3
    assert DiceLoss()(-perfect, t) > 0.4
    loss, parts = SegmentationLoss(presence_weight=1.0)(perfect, t, torch.tensor([[10.0], [-10.0]]))
    assert set(parts) == {"dice", "bce", "presence"} and parts["presence"] < 1e-3 and float(loss) < 0.01
    _, parts = SegmentationLoss(presence_weight=1.0)(perfect, t, torch.tensor([[-10.0], [10.0]]))
    assert parts["presence"] > 5
    with pytest.raises(ValueError, match="differ in shape"):
        SegmentationLoss()(perfect, t[:1])


def test_balanced_bce_by_hand():
    """A thin map (2 of 16 pixels foreground: 14 background / 2 = 7) and an empty one, all logits 0 (BCE ln 2 a pixel)."""
    t = torch.zeros(2, 1, 4, 4)
    t[0, 0, 1, 1:3] = 1
    z = torch.zeros_like(t)
    ln2 = math.log(2)
    assert float(balanced_bce(z, t, 0.0)) == pytest.approx(ln2)
    # map 0: 14 pixels weigh 1, 2 weigh 7 ** balance; map 1 (no foreground): plain
    assert float(balanced_bce(z, t, 1.0)) == pytest.approx((14 + 2 * 7 + 16) * ln2 / 32)
    assert float(balanced_bce(z, t, 0.5)) == pytest.approx((14 + 2 * 7 ** 0.5 + 16) * ln2 / 32)
    # the gradient on a foreground pixel is 7x a background pixel's at balance 1 (equal at 0)
    x = torch.zeros_like(t, requires_grad=True)
    balanced_bce(x, t, 1.0).backward()
    assert x.grad is not None
    assert float(x.grad[0, 0, 1, 1].abs() / x.grad[0, 0, 0, 0].abs()) == pytest.approx(7.0)
    # a mostly-foreground map is never down-weighted below plain BCE
    full = torch.ones(1, 1, 4, 4)
    full[0, 0, 0, 0] = 0
    assert float(balanced_bce(torch.zeros_like(full), full, 1.0)) == pytest.approx(ln2)
    _, parts = SegmentationLoss(bce_balance=1.0)(z, t)
    assert parts["bce"] == pytest.approx((14 + 2 * 7 + 16) * ln2 / 32, rel=1e-5)
    with pytest.raises(ValueError, match="bce_balance"):
        SegmentationLoss(bce_balance=1.5)
