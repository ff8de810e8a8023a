"""Composite canvases (vlseg.data.composite), class relations (prompts/hard_negatives.json) and negatives."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic_data import make_dataset

from vlseg.data import from_manifest, group_by_image
from vlseg.data.composite import CompositeSampler, make_canvas
from vlseg.data.negatives import datasets_compatible, is_relative, is_valid_negative, negative_candidates
from vlseg.prompts import class_names, class_relations, families, hard_negatives


# ----------------------------------------------------------------------------- class relations
def test_relations_file_names_only_library_classes():
    lib = {c.lower() for c in class_names()}
    for c in class_names():  # raises ValueError on a typo in the JSON
        r = class_relations(c)
        assert {x.lower() for x in r.parents + r.parts + r.co_occur + r.hard_negatives} <= lib
    assert "hard_negatives" not in families()  # the relations file is not a prompt family


def test_hard_negatives_cross_dataset_look_alikes():
    assert {"skin lesion", "breast tumor", "foot ulcer"} <= set(hard_negatives("polyp"))
    assert "cell membranes" in hard_negatives("retinal blood vessels")
    # colonoscopy and dermoscopy images show vessels of their own: retinal vessels are a hard negative there
    assert "retinal blood vessels" in hard_negatives("polyp") and "retinal blood vessels" in hard_negatives("skin lesion")
    assert "polyp" in hard_negatives("retinal blood vessels")
    assert "hook" in hard_negatives("grasper") and "heart ventricle left" in hard_negatives("liver")
    assert hard_negatives("rib left 9") == ["rib right 9"]
    assert hard_negatives("no such class") == []


def test_hierarchy_parents_and_parts():
    r = class_relations("instrument")  # a synonym resolves to "surgical instrument"
    assert r.name == "surgical instrument" and set(r.parts) == {"grasper", "hook"}
    assert class_relations("grasper").parents == ("surgical instrument",)
    assert class_relations("mitochondrial boundaries").parents == ("mitochondria",)
    for parent in ("surgical instrument", "mitochondria", "lung"):
        for part in class_relations(parent).parts:
            assert is_relative(parent, part) and is_relative(part, parent)
            assert part not in hard_negatives(parent) and parent not in hard_negatives(part)
    assert not is_relative("grasper", "hook")


def test_valid_negatives():
    # a parent or part of a shown class is never a negative, even when annotated elsewhere
    assert not is_valid_negative("surgical instrument", present=["grasper"])
    # annotated absent on this image: a valid negative even though it co-occurs with the shown classes
    assert is_valid_negative("hook", present=["grasper", "surgical instrument"], absent=["hook"])
    # unannotated but possibly visible: laparoscopic frames show the liver, CT slices show fat
    assert not is_valid_negative("liver", present=["grasper"], context=["grasper", "hook"])
    assert not is_valid_negative("fat", present=["liver"], context=["liver", "aorta"])
    assert not is_valid_negative("mitochondria", present=["cell membranes"])  # same (EM) family
    assert is_valid_negative("skin lesion", present=["polyp"])
    got = negative_candidates(["aorta", "skin lesion", "grasper", "breast tumor", "Skin Lesion"], ["polyp"])
    assert got == ["skin lesion", "breast tumor", "aorta"]  # hard first, grasper co-occurs, duplicates dropped
    assert datasets_compatible(["polyp"], ["skin lesion"]) and not datasets_compatible(["polyp"], ["grasper"])
    assert not datasets_compatible(["liver", "aorta"], ["grasper", "surgical instrument"])


# ----------------------------------------------------------------------------- make_canvas
def test_target_is_exactly_the_prompted_tile():
    # 64x32 images into the 32-wide cells of a 64-px (1, 2) canvas: scale 1, so targets are the masks, shifted
    a, b = np.zeros((64, 32, 3), np.uint8), np.full((64, 32, 3), 200, np.uint8)
    ma = np.zeros((64, 32), bool)
    ma[5:20, 3:9] = True
    mb = np.zeros((64, 32), bool)
    mb[40:60, 10:30] = True
    cv = make_canvas([(a, {"polyp": ma}), (b, {"skin lesion": mb, "breast tumor": np.zeros((64, 32), bool)})],
                     layout=(1, 2), size=64, sources=["a", "b"], datasets=["da", "db"])
    assert cv.image.shape == (64, 64, 3) and cv.image.dtype == np.uint8
    want_a = np.zeros((64, 64), bool)
    want_a[:, :32] = ma
    want_b = np.zeros((64, 64), bool)
    want_b[:, 32:] = mb
    assert np.array_equal(cv.targets["polyp"], want_a) and np.array_equal(cv.targets["skin lesion"], want_b)
    assert not cv.targets["breast tumor"].any()  # annotated absent: an empty target
    assert (cv.image[:, 32:] == 200).all() and (cv.image[:, :32] == 0).all()
    assert cv.tiles[0].cell == (0, 0, 64, 32) and cv.tiles[1].classes == ("skin lesion",)
    assert cv.tiles[1].annotated == ("skin lesion", "breast tumor") and cv.tiles[1].dataset == "db"
    assert cv.owners("skin lesion") == [1]
    assert np.array_equal(cv.other_tiles_mask("polyp"), cv.cell_mask(1))


def test_make_canvas_errors():
    img, m = np.zeros((8, 8, 3), np.uint8), {"polyp": np.zeros((8, 8), bool)}
    with pytest.raises(ValueError, match="holds 1..2 tiles"):
        make_canvas([(img, m)] * 3, layout=(1, 2))
    with pytest.raises(ValueError, match="uint8"):
        make_canvas([(img.astype(float), m)], layout=(1, 2))
    with pytest.raises(ValueError, match="does not match"):
        make_canvas([(img, {"polyp": np.zeros((4, 8), bool)})], layout=(1, 2))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(4, 40), st.integers(4, 40)), min_size=2, max_size=4),
       st.integers(0, 2**16), st.sampled_from([48, 64, 97]))
def test_make_canvas_properties(sizes, seed, size):
    rng = np.random.default_rng(seed)
    tiles = []
    for k, (h, w) in enumerate(sizes):
        img = rng.integers(1, 255, (h, w, 3), dtype=np.uint8)
        tiles.append((img, {f"class{k}": rng.random((h, w)) < 0.3}))
    layout = (2, 2) if len(tiles) > 2 else (1, 2)
    cv = make_canvas(tiles, layout, size, rng=np.random.default_rng(seed))
    again = make_canvas(tiles, layout, size, rng=np.random.default_rng(seed))
    assert np.array_equal(cv.image, again.image)  # the placement is a function of the generator's state
    inside = np.zeros((size, size), bool)
    cells = [t.cell for t in cv.tiles]
    assert len(set(cells)) == len(cells)  # one tile per cell
    for k, ((h, w), t) in enumerate(zip(sizes, cv.tiles)):
        y0, x0, y1, x1 = t.content
        cy0, cx0, cy1, cx1 = t.cell
        assert cy0 <= y0 < y1 <= cy1 and cx0 <= x0 < x1 <= cx1
        assert y1 - y0 == cy1 - cy0 or x1 - x0 == cx1 - cx0  # fills the cell along one side
        assert abs((y1 - y0) / (x1 - x0) - h / w) <= h / w * (1 / (y1 - y0) + 1 / (x1 - x0)) + 1e-9  # aspect kept
        box = np.zeros((size, size), bool)
        box[y0:y1, x0:x1] = True
        assert not (cv.targets[f"class{k}"] & ~box).any()  # a class's target never leaves its own tile
        inside |= box
    assert (cv.image[~inside] == 0).all()  # padding everywhere else


# ----------------------------------------------------------------------------- CompositeSampler
def test_sampler_is_a_pure_function_of_seed_and_step():
    ds = make_dataset(3)
    a, b = CompositeSampler(ds, seed=7, size=96), CompositeSampler(ds, seed=7, size=96)
    later = b.canvas(5)
    first = [a.canvas(s) for s in range(6)]
    assert np.array_equal(first[5].image, later.image)  # no hidden state: the order of calls does not matter
    assert all(np.array_equal(first[5].targets[c], later.targets[c]) for c in later.targets)
    assert [t.source for t in first[2].tiles] == [t.source for t in b.canvas(2).tiles]
    other = CompositeSampler(ds, seed=8, size=96)
    assert any(not np.array_equal(other.canvas(s).image, first[s].image) for s in range(6))
    assert a.pick(3, item=0) != a.pick(3, item=1) or a.pick(4, item=0) != a.pick(4, item=1)


def test_sampler_reads_tiles_through_the_given_cache():
    """Training hands the sampler its GroupCache: every tile is decoded once, then served from the cache, and the
    canvases are the same as the uncached sampler's. (An empty GroupCache is falsy: ``loader or default`` once
    dropped it, and every canvas decoded its tiles from their files again.)"""
    from vlseg.data import GroupCache

    ds = make_dataset(3)
    cache = GroupCache(1 << 30)
    assert not cache  # the trap: empty, so falsy
    cached, plain = CompositeSampler(ds, seed=7, size=96, loader=cache), CompositeSampler(ds, seed=7, size=96)
    first = cached.canvas(0)
    n = len(first.tiles)
    assert (cache.misses, cache.hits) == (n, 0)
    again = cached.canvas(0)
    assert (cache.misses, cache.hits) == (n, n)
    ref = plain.canvas(0)
    assert np.array_equal(first.image, ref.image) and np.array_equal(again.image, ref.image)
    assert first.image.std() > 0 and all(np.array_equal(again.targets[c], ref.targets[c]) for c in ref.targets)
    assert any(t.any() for t in ref.targets.values())


def test_sampler_tiles_come_from_compatible_datasets():
    ds = make_dataset(2)
    s = CompositeSampler(ds, seed=0, size=96)
    assert "tools" not in s.partners["polyps"]  # colonoscopy frames may show instruments
    for step in range(20):
        cv = s.canvas(step)
        names = [t.dataset for t in cv.tiles]
        assert 2 <= len(names) <= 4 and len(set(names)) == len(names)
        assert not {"polyps", "tools"} <= set(names)
        for c, target in cv.targets.items():
            own = np.zeros_like(target)
            for i in cv.owners(c):
                own |= cv.cell_mask(i)
            assert not (target & ~own).any()


def test_sampler_negatives_are_absent_classes():
    ds = make_dataset(2)
    s = CompositeSampler(ds, seed=1, tiles=(2, 2), size=96)
    for step in range(10):
        cv = s.canvas(step)
        neg = s.negatives(cv)
        shown = {c for t in cv.tiles for c in t.classes}
        assert neg and not shown & set(neg)
        assert all(not cv.targets.get(c, np.zeros(1, bool)).any() for c in neg)
        assert not any(n in class_relations(c).parents for n in neg for c in shown)  # "hook" may be absent
        for n in neg:  # a part of a shown class is a negative only where its tile annotates it absent
            if any(is_relative(n, c) for c in shown):
                assert any(n in t.annotated and n not in t.classes for t in cv.tiles)
        hard = {h for c in shown for h in hard_negatives(c)}
        flags = [n in hard for n in neg]
        assert flags == sorted(flags, reverse=True)  # look-alikes first


def test_hard_canvases_pair_look_alikes():
    """At hard_rate 1 a polyp tile's partner is the skin-lesion set (a look-alike) whenever the draw allows; at 0 the
    partner is uniform over compatible sets, and its canvases are those of a sampler without the option."""
    ds = make_dataset(2)
    plain, zero = CompositeSampler(ds, seed=3, tiles=(2, 2)), CompositeSampler(ds, seed=3, tiles=(2, 2), hard_rate=0.0)
    hard = CompositeSampler(ds, seed=3, tiles=(2, 2), hard_rate=1.0)
    assert hard.look_alikes["polyps"] == {"skins"} and hard.look_alikes["em"] == set()
    partners: dict[str, list[str]] = {"plain": [], "hard": []}
    for step in range(80):
        assert [g.key for g in plain.pick(step)[0]] == [g.key for g in zero.pick(step)[0]]
        for name, s in (("plain", plain), ("hard", hard)):
            gs = s.pick(step)[0]
            if gs[0].dataset == "polyps":
                partners[name].append(gs[1].dataset)
    assert partners["hard"] and set(partners["hard"]) == {"skins"}
    assert len(set(partners["plain"])) >= 2  # tools and em are compatible partners too
    assert [g.key for g in hard.pick(5)[0]] == [g.key for g in CompositeSampler(ds, seed=3, tiles=(2, 2),
                                                                                 hard_rate=1.0).pick(5)[0]]
    with pytest.raises(ValueError, match="hard_rate"):
        CompositeSampler(ds, hard_rate=1.5)


def test_sampler_needs_two_compatible_datasets():
    ds = make_dataset(1)
    only_polyps = ds.subset([i for i, r in enumerate(ds.records) if r["dataset"] == "polyps"])
    with pytest.raises(ValueError, match="two datasets"):
        CompositeSampler(only_polyps)
    with pytest.raises(ValueError, match="tiles"):
        CompositeSampler(ds, tiles=(1, 5))


def test_sampler_on_shared_data(shared_data):
    ds = from_manifest(shared_data / "manifest_all.jsonl")
    s = CompositeSampler(ds, seed=0, size=256)
    assert {"drive", "chase_db1"}.isdisjoint({d for d in s.partners["drive"] if d == "chase_db1"})
    assert "cholec_instance_seg_sample" not in s.partners["cvc_clinicdb"]
    assert "samed2d_demo_ct" not in s.partners["cholec_instance_seg_sample"]  # laparoscopy shows the liver
    groups = {g.key: g for g in group_by_image(ds)}
    for step in range(4):
        cv = s.canvas(step)
        assert len({t.dataset for t in cv.tiles}) == len(cv.tiles)
        for t in cv.tiles:
            assert set(t.annotated) == set(groups[t.source].classes)
        for c, target in cv.targets.items():
            outside = np.ones_like(target)
            for i in cv.owners(c):
                outside &= ~cv.cell_mask(i)
            assert not (target & outside).any()
