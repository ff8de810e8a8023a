"""Question engine (vlseg.vqa.engine) and boxes (vlseg.vqa.boxes): scene-graph facts, truthful answers with the
right masks, determinism, answer balance. Property tests draw masks from random rectangles and discs per class."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from vlseg.vqa import (
    TYPES,
    QARecord,
    box_iou,
    build_scene_graph,
    generate_qa,
    mask_to_box,
    normalize_box,
)
from vlseg.vqa.engine import POSITIONS, TEMPLATES

NAMES = ("grasper", "hook", "liver", "gallbladder")


def _shape_mask(h: int, w: int, kind: str, y: int, x: int, a: int, b: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    if kind == "rect":
        m[y:y + a, x:x + b] = True
    else:
        yy, xx = np.mgrid[:h, :w]
        m[(yy - y) ** 2 + (xx - x) ** 2 <= a * a] = True
    return m


@st.composite
def scenes(draw):
    h, w = draw(st.integers(24, 48)), draw(st.integers(24, 48))
    n = draw(st.integers(1, 4))
    names = draw(st.permutations(NAMES))[:n]
    masks = {}
    for name in names:
        m = np.zeros((h, w), bool)
        for _ in range(draw(st.integers(0, 3))):  # 0 shapes: an empty mask, i.e. an absent class
            kind = draw(st.sampled_from(["rect", "disc"]))
            y, x = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
            a, b = draw(st.integers(1, max(1, h // 3))), draw(st.integers(1, max(1, w // 3)))
            m |= _shape_mask(h, w, kind, y, x, a, b)
        masks[name] = m
    absent = [c for c in ("clip", "scissors") if draw(st.booleans())]
    return masks, absent, draw(st.integers(0, 2**16))


def _centroid(m: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(m)
    return cols.mean(), rows.mean()


def _cell_word(x: float, y: float, w: int, h: int) -> str:
    col, row = min(int((x + 0.5) / w * 3), 2), min(int((y + 0.5) / h * 3), 2)
    return POSITIONS[row * 3 + col]


def _check_record(rec: QARecord, masks: dict[str, np.ndarray], h: int, w: int) -> None:
    full = {**masks}
    for c in rec.classes:
        full.setdefault(c, np.zeros((h, w), bool))
    assert rec.type in TYPES and isinstance(rec.answer, str) and rec.question.strip()
    assert rec["question"] == rec.question and rec.to_dict()["answer"] == rec.answer
    no_region = (rec.type == "existence" and rec.answer == "no") or (rec.type == "counting" and rec.answer == "0")
    assert (rec.mask is None) == no_region, rec
    if rec.mask is not None:
        assert rec.mask.shape == (h, w) and rec.mask.dtype == bool and rec.mask.any()
        union = np.zeros((h, w), bool)
        for c in rec.classes:
            union |= full[c]
        assert not (rec.mask & ~union).any(), f"mask reaches outside {rec.classes}"
    a = full[rec.classes[0]] if rec.classes else None
    b = full[rec.classes[1]] if len(rec.classes) > 1 else None
    if rec.kind == "existence":
        assert (rec.answer == "yes") == bool(a.any())
    elif rec.kind == "counting":
        assert int(rec.answer) == ndimage.label(a)[1]
    elif rec.kind == "location":
        assert rec.answer == _cell_word(*_centroid(a), w, h)
    elif rec.kind in ("left_of", "right_of", "above", "below"):
        (ax, ay), (bx, by) = _centroid(a), _centroid(b)
        truth = {"left_of": ax < bx, "right_of": ax > bx, "above": ay < by, "below": ay > by}[rec.kind]
        assert (rec.answer == "yes") == truth, rec
    elif rec.kind in ("which_left", "which_above"):
        other = b if rec.answer == rec.classes[0] else a
        mine = a if rec.answer == rec.classes[0] else b
        i = 0 if rec.kind == "which_left" else 1
        assert rec.answer in rec.classes and _centroid(mine)[i] < _centroid(other)[i]
        assert np.array_equal(rec.mask, full[rec.answer])
    elif rec.kind == "overlap":
        assert (rec.answer == "yes") == bool((a & b).any())
    elif rec.kind == "touching":
        grown = ndimage.binary_dilation(a)
        assert (rec.answer == "yes") == bool((grown & b).any())
    elif rec.kind in ("larger", "smaller"):
        bigger = a.sum() > b.sum()
        assert (rec.answer == "yes") == (bigger if rec.kind == "larger" else not bigger)
    elif rec.kind == "which_larger":
        other = b if rec.answer == rec.classes[0] else a
        assert full[rec.answer].sum() > other.sum()
    elif rec.kind == "largest":
        assert all(full[rec.answer].sum() > m.sum() for n, m in masks.items() if n != rec.answer)
    elif rec.kind == "size":
        frac = a.mean()
        assert rec.answer == ("small" if frac < 0.01 else "medium" if frac < 0.10 else "large")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_answers_agree_with_masks(scene):
    masks, absent, seed = scene
    h, w = next(iter(masks.values())).shape
    # min_area_fraction=0: every component is an object, so counts are plain scipy.ndimage.label counts
    records = generate_qa(masks, seed=seed, absent=absent, max_per_type=4, min_area_fraction=0)
    assert records, "a scene with at least one class always has an existence question"
    for rec in records:
        _check_record(rec, masks, h, w)
    assert len({r.question for r in records}) == len(records)


@settings(max_examples=25, deadline=None)
@given(scenes())
def test_same_seed_same_records(scene):
    masks, absent, seed = scene
    a = generate_qa(masks, seed=seed, absent=absent)
    b = generate_qa(masks, seed=seed, absent=absent)
    assert a == b


def _random_scene(rng: np.random.Generator, h: int = 40, w: int = 40) -> tuple[dict[str, np.ndarray], list[str]]:
    masks = {}
    for name in rng.choice(NAMES, size=int(rng.integers(1, 4)), replace=False):
        m = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, 4))):
            m |= _shape_mask(h, w, str(rng.choice(["rect", "disc"])), int(rng.integers(h)), int(rng.integers(w)),
                             int(rng.integers(3, 12)), int(rng.integers(3, 12)))
        masks[str(name)] = m
    absent = [c for c in ("clip", "scissors", "stapler") if rng.random() < 0.5]
    return masks, absent


def test_seeds_change_questions_and_answers_stay_balanced():
    rng = np.random.default_rng(0)
    by_type: dict[str, Counter] = {t: Counter() for t in TYPES}
    differs = 0
    for i in range(150):
        masks, absent = _random_scene(rng)
        recs = generate_qa(masks, seed=i, absent=absent)
        differs += [r.question for r in recs] != [r.question for r in generate_qa(masks, seed=i + 1, absent=absent)]
        for r in recs:
            by_type[r.type][r.answer] += 1
    assert differs > 50
    assert all(by_type[t] for t in TYPES), {t: sum(c.values()) for t, c in by_type.items()}
    yes, no = by_type["existence"]["yes"], by_type["existence"]["no"]
    assert 0.35 < yes / (yes + no) < 0.65, by_type["existence"]
    rel = by_type["relative position"]
    assert 0.3 < rel["yes"] / (rel["yes"] + rel["no"]) < 0.7, rel
    counts = by_type["counting"]
    assert len(counts) >= 3 and counts["1"] < 0.6 * sum(counts.values()), counts
    assert len(by_type["location"]) >= 5


def _scene() -> dict[str, np.ndarray]:
    h, w = 60, 90
    m = {n: np.zeros((h, w), bool) for n in ("grasper", "hook", "liver")}
    m["grasper"][5:15, 5:20] = True     # upper left
    m["grasper"][45:55, 5:20] = True    # lower left: two grasper objects
    m["hook"][5:25, 60:85] = True       # upper right
    m["liver"][40:60, 40:90] = True     # lower right, touches nothing
    m["liver"][0, 0] = True             # a 1-pixel speck: liver is present but not countable
    return m


def test_scene_graph_facts():
    sg = build_scene_graph(_scene(), absent=["clip"])
    g, hook, liver, clip = (sg.classes[n] for n in ("grasper", "hook", "liver", "clip"))
    assert (g.count, g.specks, g.spread, g.position) == (2, 0, True, "center left")
    assert [o.position for o in g.objects] == ["upper left", "lower left"]
    assert g.objects[0].box == (5.0, 5.0, 20.0, 15.0) and g.objects[0].area == 150
    assert (hook.count, hook.position, hook.size) == (1, "upper right", "medium")
    assert liver.present and liver.count == 1 and liver.specks == 1 and not liver.countable
    assert not clip.present and clip.count == 0 and clip.position is None
    assert sg.holds("grasper", "left of", "hook") and sg.holds("hook", "right of", "grasper")
    assert sg.holds("hook", "above", "liver") and not sg.holds("grasper", "touches", "hook")
    assert not sg.holds("grasper", "above", "liver")  # grasper has parts both above and level with the liver
    assert sg.present() == ["grasper", "hook", "liver"] and sg.absent() == ["clip"]


def test_specks_are_not_counted_and_absent_is_checked():
    masks = _scene()
    recs = generate_qa(masks, seed=3, types=["counting", "existence"], max_per_type=10)
    counted = {r.classes[0]: r.answer for r in recs if r.type == "counting"}
    assert counted == {"grasper": "2", "hook": "1"}   # liver has a speck: no honest count
    assert {r.classes[0]: r.answer for r in recs if r.type == "existence"}["liver"] == "yes"
    with pytest.raises(ValueError, match="'hook' is listed as absent"):
        generate_qa(masks, absent=["hook"])


def test_union_class_is_never_compared_with_its_parts():
    m = _scene()
    m["surgical instrument"] = m["grasper"] | m["hook"]
    parts = {"surgical instrument": ["grasper", "hook"]}
    for seed in range(20):
        for r in generate_qa(m, seed=seed, parts=parts, types=["relative position", "size comparison"],
                             max_per_type=20):
            assert not ("surgical instrument" in r.classes and {"grasper", "hook"} & set(r.classes)), r
    sg = build_scene_graph(m, parts=parts)
    assert not any({x.subject, x.object} == {"surgical instrument", "grasper"} for x in sg.relations)
    assert sg.holds("surgical instrument", "touches", "liver") is False


def test_questions_are_templated_and_limits_hold():
    recs = generate_qa(_scene(), seed=0, absent=["clip"], max_per_type=1)
    assert len(recs) <= len(TYPES) and len({r.type for r in recs}) == len(recs)
    assert all(any(r.question == t.format(a=r.classes[0] if r.classes else "",
                                          b=r.classes[1] if len(r.classes) > 1 else "", pos=p)
                   for t in TEMPLATES[r.kind] for p in POSITIONS) for r in recs)
    assert len(generate_qa(_scene(), seed=0, max_questions=3)) == 3
    custom = generate_qa(_scene(), seed=0, types=["existence"], templates={"existence": ["Any {a} here?"]})
    assert all(r.question.startswith("Any ") for r in custom)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'hook'.*same size"):
        generate_qa({"grasper": np.zeros((4, 4)), "hook": np.zeros((5, 4))})
    with pytest.raises(ValueError, match="unknown question types"):
        generate_qa({"grasper": np.ones((4, 4))}, types=["colour"])
    with pytest.raises(ValueError, match="must use the fields"):
        generate_qa({"grasper": np.ones((4, 4))}, templates={"existence": ["Is there a {b}?"]})
    with pytest.raises(ValueError, match="non-empty mapping"):
        generate_qa({})


def test_record_is_frozen_and_mapping_like():
    rec = generate_qa(_scene(), seed=0)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.answer = "x"  # type: ignore[misc]
    assert set(rec.to_dict()) == {"question", "answer", "type", "mask", "classes", "kind"}
    with pytest.raises(KeyError, match="fields"):
        rec["nope"]


# ---- boxes ----------------------------------------------------------------------------------------------------------
def test_mask_to_box_uses_pixel_edges():
    m = np.zeros((10, 20), bool)
    m[2:5, 3:7] = True
    assert mask_to_box(m) == (3.0, 2.0, 7.0, 5.0)
    assert mask_to_box(m, normalized=True) == (0.15, 0.2, 0.35, 0.5)
    with pytest.raises(ValueError, match="empty"):
        mask_to_box(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="outside"):
        normalize_box((0, 0, 21, 5), 20, 10)


def test_box_iou_matches_mask_iou():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0.5, 0.5, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5)) == 0.0  # two empty boxes: 0, not NaN
    rng = np.random.default_rng(0)
    for _ in range(30):
        a, b = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
        y, x = rng.integers(0, 28, 2)
        a[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
        y, x = rng.integers(0, 28, 2)
        b[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
        want = (a & b).sum() / (a | b).sum()
        assert box_iou(mask_to_box(a, normalized=True), mask_to_box(b, normalized=True)) == pytest.approx(want)
    matrix = box_iou([[0, 0, 1, 1], [0, 0, 0.5, 1]], [[0, 0, 1, 1]])
    assert matrix.shape == (2, 1) and matrix[1, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="x2 < x1"):
        box_iou((1, 0, 0, 1), (0, 0, 1, 1))
