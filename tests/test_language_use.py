"""Language-use checks (vlseg.language_use) on constructed cases with hand-checked numbers, and on a tiny model."""

import dataclasses
import hashlib
import json
import math
import sys

import numpy as np
import pytest
from synthetic_data import ignores_prompt, make_dataset, oracle

import vlseg
from vlseg import language_use as lu
from vlseg import stats
from vlseg.data.negatives import is_relative, may_co_occur


def test_prompt_ignoring_model_is_caught():
    # two 32x32 images, each with one 12x12 square, side by side on a 64-px canvas: scale 1, so exact numbers
    ds = make_dataset(2, single_only=True)
    r = lu.language_use_report(ignores_prompt, ds, n_canvases=4, canvas_size=64, keep_rows=True)
    comp = r["composite"]
    assert comp["n"] == 8 and {row["tiles"] for row in r["rows"]["composite"]} == {2}
    assert comp["leak"] == pytest.approx(0.5)  # half of what it marks is the other image's object
    assert comp["dice_class"] == pytest.approx(2 / 3) and comp["dice_empty"] == pytest.approx(2 / 3)
    assert comp["gain"] == pytest.approx(0.0) and comp["pass"] is False
    assert {c: (v["leak"], v["leak_share"]) for c, v in comp["per_class"].items()} == \
        {"polyp": (pytest.approx(0.5), pytest.approx(0.5)), "skin lesion": (pytest.approx(0.5), pytest.approx(0.5))}
    assert r["wrong_class"]["empty_rate"] == 0.0 and r["wrong_class"]["pass"] is False
    assert r["wrong_class"]["hard"]["n"] == 4  # polyp <-> skin lesion are look-alikes
    assert r["presence"]["auroc"] == pytest.approx(0.5)  # the same score for every prompt
    assert r["class_vs_empty"]["gain"] == pytest.approx(0.0)  # alone in its image, the object is all there is
    assert r["levels"]["spread"] == pytest.approx(0.0)
    assert all(v == 0.0 for v in r["levels"]["wrong_class_empty_per_level"].values())  # at no level either
    assert r["own_other"]["pass"] is None  # no multi-class images: not run
    assert r["pass"] is False
    line = lu.summary_line(r)
    assert line.startswith("language use: ") and "\n" not in line and "FAIL" in line and "n/a" in line


def test_canvas_figures_per_prompted_class_show_who_leaks_and_who_is_emptied():
    """Skin-lesion prompts mark every object (leak 1/2 each), polyp prompts give empty masks: the pooled leak is the
    skin lesion's, all of it is the skin lesion's share, and the polyp's masks are all empty."""

    def mixed(image, prompts):
        p = ignores_prompt(image, prompts)
        polyp = np.array(["polyp" in t for t in prompts])
        masks = p.masks & ~polyp[:, None, None]
        return vlseg.Prediction(masks=masks, probs=masks.astype(np.float32), presence=p.presence,
                                has_presence_head=True)

    comp = lu.language_use_report(mixed, make_dataset(2, single_only=True), n_canvases=4, canvas_size=64)["composite"]
    assert comp["leak"] == pytest.approx(0.5) and comp["empty_prediction_rate"] == pytest.approx(0.5)
    per = comp["per_class"]
    assert set(per) == {"polyp", "skin lesion"} and per["polyp"]["n"] == per["skin lesion"]["n"] == 4
    assert per["polyp"] == {"n": 4, "empty_prediction_rate": 1.0, "dice_class": 0.0, "leak": None, "leak_share": 0.0}
    sk = per["skin lesion"]
    assert sk["empty_prediction_rate"] == 0.0 and sk["dice_class"] == pytest.approx(2 / 3)
    assert sk["leak"] == pytest.approx(0.5) and sk["leak_share"] == pytest.approx(1.0)


def test_canvas_examples_show_the_leak():
    """The pictures the evaluation saves: a prompt-ignoring model's mask covers both tiles' objects, the target only
    the prompted one; each example's leak is the report row's."""
    ds = make_dataset(2, single_only=True)
    r = lu.language_use_report(ignores_prompt, ds, n_canvases=4, canvas_size=64, keep_rows=True, canvas_examples=3)
    ex = r["canvas_examples"]
    assert len(ex) == 3 and "canvas_examples" not in lu.language_use_report(ignores_prompt, ds, n_canvases=4,
                                                                            canvas_size=64)
    for e, row in zip(ex, r["rows"]["composite"]):
        assert e["image"].shape == (64, 64, 3) and e["target"].shape == e["pred"].shape == (64, 64)
        assert e["target"].sum() == 144 and e["pred"].sum() == 288 and (e["pred"] & e["target"]).sum() == 144
        assert e["leak"] == pytest.approx(0.5) == row["leak"] and e["class"] == row["class"]


def test_oracle_passes_every_check():
    ds = make_dataset(2)
    r = lu.language_use_report(oracle, ds, n_canvases=6, canvas_size=96)
    json.dumps(r, allow_nan=False)
    assert r["wrong_class"]["empty_rate"] == 1.0 and r["wrong_class"]["true_kept_rate"] == 1.0
    assert r["presence"]["auroc"] == 1.0 and r["presence"]["auroc_absent"] == 1.0  # the hook-less frame
    assert r["composite"]["leak"] == 0.0 and r["composite"]["dice_class"] > 0.9
    assert r["composite"]["gain"] > 0.9  # the empty prompt names nothing
    per = r["own_other"]["per_dataset"]
    assert set(per) == {"tools", "em"}  # grasper vs hook; surgical instrument is not "other" to its parts
    assert all(v["own"] == 1.0 and v["other"] == 0.0 and v["ratio"] >= 100 for v in per.values())
    assert r["levels"]["spread"] == 0.0 and r["levels"]["per_level"]["p9"] == 1.0
    assert r["n_checks"] == 5 and r["n_pass"] == 5 and r["pass"] is True
    assert lu.summary_line(r).endswith("5/5 pass")


def test_level_spread_made_by_the_presence_gate_shows():
    """A model whose masks are right at every level but whose presence gate empties long prompts: the gated spread
    is the share of prompts gated away, the ungated spread 0, and the summary line says so."""

    def gates_long_prompts(image, prompts):
        p = oracle(image, prompts)
        long = np.array([len(t.split()) > 6 for t in prompts])
        presence = np.where(long, 0.1, p.presence).astype(np.float32)
        return vlseg.Prediction(masks=p.masks & ~long[:, None, None], probs=p.probs, presence=presence,
                                has_presence_head=True)

    ds = make_dataset(2)
    r = lu.language_use_report(gates_long_prompts, ds, n_canvases=2, canvas_size=96)
    lv = r["levels"]
    assert all(v == 1.0 for v in lv["per_level_ungated"].values()) and lv["spread_ungated"] == 0.0
    away = lv["gated_away_per_level"]
    assert away["p1"] == 0.0 and away["p9"] == 1.0  # "polyp" is kept; p9 adds a definition sentence
    for level, dice in lv["per_level"].items():  # a kept mask is exact, a gated one scores 0
        assert dice == pytest.approx(1.0 - away[level])
    assert lv["spread"] == pytest.approx(1.0) and lv["pass"] is False
    assert lv["spread_se"] == 0.0  # every image gates p9 away: every resample reads the same spread
    assert "p1-p9 spread 100.0 pts (se 0.0; p1 Dice 1.000; 0.0 before the presence gate;" in lu.summary_line(r)
    assert "before the presence gate" in lu.summary_line(lu.language_use_report(oracle, ds, n_canvases=2,
                                                                                canvas_size=96))


def test_level_spread_made_by_one_dataset_shows_in_its_breakdown():
    """The presence gate empties long prompts about polyps only: the polyp set's own levels spread (its p9 masks
    all gated away), every other set's do not, and leaving the polyp set out takes the pooled spread to 0."""

    def gates_long_polyp_prompts(image, prompts):
        p = oracle(image, prompts)
        gate = np.array([len(t.split()) > 6 and "polyp" in t for t in prompts])
        return vlseg.Prediction(masks=p.masks & ~gate[:, None, None], probs=p.probs,
                                presence=np.where(gate, 0.1, p.presence).astype(np.float32), has_presence_head=True)

    ds = make_dataset(2)
    r = lu.language_use_report(gates_long_polyp_prompts, ds, n_canvases=2, canvas_size=96)
    lv = r["levels"]
    by = lv["per_dataset"]
    assert set(by) == {"em", "polyps", "skins", "tools"}
    assert sum(v["n"] for v in by.values()) == lv["n"] and by["polyps"]["n"] % 9 == 0
    pol = by["polyps"]
    assert pol["gated_away_per_level"]["p1"] == 0.0 and pol["gated_away_per_level"]["p9"] == 1.0
    assert pol["per_level"]["p9"] == 0.0 and pol["spread"] == 1.0 and pol["spread_without"] == 0.0
    for d in ("em", "skins", "tools"):
        assert by[d]["spread"] == 0.0 and set(by[d]["gated_away_per_level"].values()) == {0.0}
        # the polyp set is still in: its share of the remaining rows is the spread
        assert by[d]["spread_without"] == pytest.approx(pol["n"] / (lv["n"] - by[d]["n"]))
    assert "; 0.0 without polyps) [<=3 pts FAIL]" in lu.summary_line(r)
    share = pol["n"] / lv["n"]  # the pooled p9 Dice loses exactly the polyp set's share of rows
    assert lv["per_level"]["p9"] == pytest.approx(1.0 - share) and lv["spread"] == pytest.approx(share)


def test_wrong_classes_are_safe_and_deterministic():
    ds = make_dataset(2)
    groups = lu.select_groups(ds, max_images=None, seed=0)
    assert [g.dataset for g in groups[:4]] == ["em", "polyps", "skins", "tools"]  # round-robin over datasets
    items = list(lu._items(ds, groups, seed=3, progress=False))
    again = list(lu._items(ds, groups, seed=3, progress=False))
    assert [it.wrong for it in items] == [it.wrong for it in again]
    for it in items:
        assert it.wrong, it.key
        for c, kind in it.wrong:
            assert c not in it.context and not any(may_co_occur(c, k) for k in it.context)
            assert not any(is_relative(c, p) for p in it.present)
        if it.dataset == "polyps":
            assert it.wrong[0] == ("skin lesion", "hard")
        if it.dataset == "tools":  # endoscopic scenes: no polyp; a laparoscopic frame shows the liver
            assert "polyp" not in dict(it.wrong)


def test_wrong_class_draw_ignores_paths_and_row_order():
    # the same images under other paths (absolute vs relative manifest spellings) and in another row order must be
    # asked the same wrong classes: the draw is keyed by dataset + pixels, and the candidates are sorted
    ds = make_dataset(3)
    moved = type(ds)([{**r, "image": f"/elsewhere/{r['dataset']}/{r['image']}.png"} for r in reversed(ds.records)])

    def draws(d, per_kind=lu.WRONG_PER_KIND):
        items = lu._items(d, lu.select_groups(d, max_images=None, seed=0), seed=5, progress=False,
                          wrong_per_kind=per_kind)
        return {lu.draw_key(it.dataset, it.image): sorted(it.wrong) for it in items}

    first = draws(ds)
    assert len(first) == 12 and draws(moved) == first
    assert draws(ds) != {k: v for k, v in zip(first, reversed(list(first.values())))}  # not all alike
    for key, wrong in first.items():
        names = [c for c, _ in wrong]
        assert len(names) == len(set(names))  # no class twice
        assert sum(k == "random" for _, k in wrong) == 2  # tools/em/skins/polyps each leave >= 2 other classes
        if key.startswith(("polyps:", "skins:")):  # each other's one look-alike in this pool
            assert [c for c, k in wrong if k == "hard"] == ["skin lesion" if key[0] == "p" else "polyp"]
    one = draws(ds, 1)
    assert all(sum(k == "random" for _, k in v) == 1 and len(v) <= 2 for v in one.values()) and one != first
    assert lu.draw_key("a", np.zeros((2, 2, 3), np.uint8)) != lu.draw_key("a", np.zeros((2, 2, 3), np.uint8) + 1)
    assert lu.draw_key("a", np.zeros((2, 2, 3), np.uint8)) != lu.draw_key("b", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="wrong_per_kind"):
        draws(ds, 0)
    # the report asks every drawn class as a class name, and the first of each kind at every prompt level too
    rows = lu.language_use_report(ignores_prompt, ds, n_canvases=1, canvas_size=64, keep_rows=True)["rows"]
    for it in lu._items(ds, lu.select_groups(ds, None, 0), seed=0, progress=False):
        asked = [(r["class"], r["kind"][6:]) for r in rows["presence"]
                 if r["image"] == it.key and r["kind"].startswith("wrong_")]
        assert asked == it.wrong
        by_level = [r["class"] for r in rows["levels_wrong"] if r["image"] == it.key and r["level"] == "p5"]
        firsts = [next(c for c, k in it.wrong if k == kind) for kind in dict.fromkeys(k for _, k in it.wrong)]
        assert by_level == firsts


def _sloppy(image, prompts):
    """The oracle's masks shifted right by 0-24 px and its presence scaled, both by the image's pixels: every figure
    then depends on which images (and canvases) a report takes, and some masks cross onto a canvas's other tile."""
    p = oracle(image, prompts)
    shift = int(lu.draw_key("", image)[-2:], 16) % 5
    masks = np.roll(p.masks, 6 * shift, axis=2)
    return vlseg.Prediction(masks=masks, probs=masks.astype(np.float32), presence=p.presence * (0.5 + shift / 10),
                            has_presence_head=True)


def _unsure(image, prompts):
    """_sloppy with a presence score blurred by a draw keyed by prompt and pixels (an AUROC below 1) that gates
    its masks, and a prompt the oracle leaves empty (a wrong class) segmenting every coloured thing: some true
    masks are gated away, some wrong-class prompts keep a mask."""
    p, every = _sloppy(image, prompts), ignores_prompt(image, prompts).masks
    blur = np.array([int(hashlib.sha256((t + lu.draw_key("", image)).encode()).hexdigest()[:4], 16) / 65535
                     for t in prompts], np.float32)
    presence = 0.4 * p.presence + 0.6 * blur
    has = p.masks.reshape(len(prompts), -1).any(1)
    masks = np.where(has[:, None, None], p.masks, every) & (presence >= 0.5)[:, None, None]
    return vlseg.Prediction(masks=masks, probs=masks.astype(np.float32), presence=presence, has_presence_head=True)


def test_report_and_evaluation_ignore_paths_and_row_order(monkeypatch):
    """The whole language-use report (its image selection below max_images, its canvases) and evaluate_dataset's
    samples and ablation draws are seeded over the images' contents: the same data listed in another order under
    other paths gives the same figures; another seed gives other ones (so the check is not trivial)."""
    from vlseg import evaluation
    from vlseg.data.groups import content_order

    ds = make_dataset(3)
    moved = type(ds)([{**r, "image": f"/elsewhere/{r['dataset']}/{r['image']}.png"} for r in reversed(ds.records)])
    assert [ds.records[i]["image"] for i in content_order(ds)] == \
        [moved.records[i]["image"].split("/")[-1][:-4] for i in content_order(moved)]

    def report(d, seed=0):  # rounded: rows of one image may be summed in another order (last-bit differences)
        return json.loads(json.dumps(lu.language_use_report(_sloppy, d, seed=seed, max_images=7, n_canvases=5,
                                                            canvas_size=96)),
                          parse_float=lambda x: round(float(x), 12))

    first = report(ds)
    assert first["n_images"] == 7 and report(moved) == first
    assert report(ds, seed=1) != first

    monkeypatch.setattr(evaluation, "segment", lambda model, image, texts, **kw: _sloppy(image, texts).masks)

    def evaluated(d, seed=0):
        summary, rows = evaluation.evaluate_dataset(None, d, ("p1", "p6"), max_samples=9, seed=seed, ablations=True)
        return summary, sorted((r["class_name"], r["level"], r["dice"]) for r in rows)

    assert evaluated(moved) == evaluated(ds) and evaluated(ds, seed=2) != evaluated(ds)


def test_standard_errors_by_hand_and_in_the_report():
    """cluster_se is the cluster-robust standard error of a mean: by hand on two clusters; the plain sd / sqrt(n)
    when every row is its own cluster; None for one cluster. The report carries the wrong-class rate's (by image),
    the canvas gain's and leak's (multiway over every image on a canvas; by canvas as *_se_canvas), the summary line
    shows them, and the default canvas count is 2 per image."""
    assert stats.cluster_se([1, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(0.25)  # sqrt(2 * (0.5^2 + 0.5^2)) / 4
    y = [0.1, 0.7, 0.4, 0.9, 0.2]
    assert stats.cluster_se(y, range(5)) == pytest.approx(np.std(y, ddof=1) / math.sqrt(5))
    assert stats.cluster_se([1, 0, None], ["a", "a", "b"]) is None and stats.cluster_se([], []) is None
    ds = make_dataset(2)
    r = lu.language_use_report(_unsure, ds, canvas_size=96, keep_rows=True)
    comp, rows = r["composite"], r["rows"]["composite"]
    assert comp["n_canvases"] == 2 * r["n_images"] == 16
    leaks, gains = [x["leak"] for x in rows], [x["dice_class"] - x["dice_empty"] for x in rows]
    assert comp["leak_se"] == pytest.approx(stats.multiway_se(leaks, [x["sources"] for x in rows]))
    assert comp["gain_se"] == pytest.approx(stats.multiway_se(gains, [x["sources"] for x in rows]))
    assert comp["leak_se"] > 0 and comp["gain_se"] > 0
    assert comp["leak_se_canvas"] == pytest.approx(stats.cluster_se(leaks, [x["canvas"] for x in rows]))
    assert all(len(set(x["sources"])) == x["tiles"] == 2 for x in rows)
    assert comp["n_images"] < 2 * comp["n_canvases"]  # canvases reuse images: hence the standard error by image
    wrong = [x for x in r["rows"]["presence"] if x["kind"].startswith("wrong_")]
    assert len({x["image"] for x in wrong}) < len(wrong)  # several wrong-class prompts per image: clusters matter
    assert r["wrong_class"]["empty_rate_se"] == pytest.approx(
        stats.cluster_se([float(x["empty"]) for x in wrong], [x["image"] for x in wrong]))
    assert r["wrong_class"]["empty_rate_se"] != pytest.approx(
        stats.cluster_se([float(x["empty"]) for x in wrong], range(len(wrong))))
    line = lu.summary_line(r)
    assert f"leak {100 * comp['leak']:.1f}% (se {100 * comp['leak_se']:.1f})" in line
    assert f"canvas gain {comp['gain']:+.3f} (se {comp['gain_se']:.3f})" in line
    wc = r["wrong_class"]
    assert f"empty {100 * wc['empty_rate']:.1f}% (se {100 * wc['empty_rate_se']:.1f}; true kept" in line
    old = {**r, "composite": {k: v for k, v in comp.items() if not k.endswith("_se")}}
    assert "(se" not in lu.summary_line(old).split("| canvas")[1].split("|")[0]  # reports from before: no note


def test_multiway_standard_error_by_hand():
    """multiway_se: with one cluster per row it is cluster_se; by hand on rows in two clusters each; a row-level
    value with no cluster effect reads near the plain sd / sqrt(n), where shared clusters that move their rows
    together read well above it."""
    y = [0.1, 0.7, 0.4, 0.9, 0.2, 0.5]
    c = ["a", "a", "b", "b", "c", "c"]
    assert stats.multiway_se(y, [[x] for x in c]) == pytest.approx(stats.cluster_se(y, c))
    # rows (0, [a, b]), (1, [b, c]), (2, [a, c]); mean 1, residuals -1, 0, 1: S_a = 0, S_b = -1, S_c = 1;
    # own squares counted once: sum S^2 - (2 - 1) * (1 + 0 + 1) = 0 -> 0
    assert stats.multiway_se([0, 1, 2], [["a", "b"], ["b", "c"], ["a", "c"]]) == 0.0
    # rows (0, [a, b]), (2, [a, c]), (2, [d]), (0, [d]): mean 1, residuals -1, 1, 1, -1; S_a = 0, S_b = -1,
    # S_c = 1, S_d = 0; sum S^2 = 2, minus the own squares counted twice (1 + 1) = 0 -> 0: the pair cancels
    assert stats.multiway_se([0, 2, 2, 0], [["a", "b"], ["a", "c"], ["d"], ["d"]]) == 0.0
    # (0, [a]), (2, [b]), (1, [c]) is three independent rows: sqrt(3/2 * 2) / 3
    assert stats.multiway_se([0, 2, 1], [["a"], ["b"], ["c"]]) == pytest.approx(math.sqrt(3) / 3)
    n_img, n_rows = 40, 400
    ratios = []  # no cluster effect: the variance reads the plain one on average (one draw is noisy)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        pairs = [rng.choice(n_img, 2, replace=False) for _ in range(n_rows)]
        noise = rng.normal(size=n_rows)
        plain = np.std(noise, ddof=1) / math.sqrt(n_rows)
        ratios.append((stats.multiway_se(list(noise), pairs) / plain) ** 2)
    assert 0.7 < np.mean(ratios) < 1.3
    effect = rng.normal(size=n_img)  # the last draw's pairs, now with an effect per image
    driven = [effect[a] + effect[b] + 0.1 * e for (a, b), e in zip(pairs, noise, strict=True)]
    assert stats.multiway_se(driven, pairs) > 3 * np.std(driven, ddof=1) / math.sqrt(n_rows)
    assert stats.multiway_se([1.0, None], [["a"], ["b"]]) is None and stats.multiway_se([], []) is None


def test_bootstrap_standard_error_clusters_by_image_and_reaches_the_report():
    """cluster_bootstrap_se of a mean agrees with the analytic sd / sqrt(n) (within 20%: 200 resamples); rows of one
    image move together, so copying every row of each image leaves it unchanged where rows taken apart would shrink
    it by sqrt(2); one image, or a figure every resample reads alike, gives None / 0. The report and its line carry
    the AUROC's and the level spread's."""
    y = np.random.default_rng(3).normal(size=60)
    rows = [{"image": i, "v": float(v)} for i, v in enumerate(y)]

    def mean(rs: list) -> float:
        return float(np.mean([r["v"] for r in rs]))

    se = stats.cluster_bootstrap_se(rows, mean)
    assert se == pytest.approx(np.std(y, ddof=1) / math.sqrt(len(y)), rel=0.2)
    assert stats.cluster_bootstrap_se(rows + rows, mean) == pytest.approx(se)  # same images, each twice: same clusters
    apart = [{**r, "image": (r["image"], copy)} for r in rows for copy in (0, 1)]
    assert stats.cluster_bootstrap_se(apart, mean) == pytest.approx(se / math.sqrt(2), rel=0.2)
    assert stats.cluster_bootstrap_se([{"image": 0, "v": 1.0}] * 3, mean) is None
    assert stats.cluster_bootstrap_se([{"image": i, "v": 1.0} for i in range(4)], mean) == 0.0
    r = lu.language_use_report(_unsure, make_dataset(2), canvas_size=96, keep_rows=True)
    pr, lv, rows = r["presence"], r["levels"], r["rows"]
    assert 0.5 < pr["auroc"] < 1 and pr["auroc_se"] > 0 and lv["spread_se"] > 0
    assert pr["auroc_se"] == stats.cluster_bootstrap_se(
        rows["presence"], lambda rs: lu.auroc([x["label"] for x in rs], [x["score"] for x in rs]))
    spread = stats.cluster_bootstrap_se(rows["levels"], lambda rs: lu._spread(lu._per_level(rs, "dice")))
    assert lv["spread_se"] == spread
    line = lu.summary_line(r)
    assert f"presence AUROC {pr['auroc']:.3f} (se {pr['auroc_se']:.3f})" in line
    assert f"p1-p9 spread {100 * lv['spread']:.1f} pts (se {100 * lv['spread_se']:.1f}; p1 Dice" in line


def test_auroc():
    assert lu.auroc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert lu.auroc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert lu.auroc([1, 1], [0.3, 0.4]) is None
    rng = np.random.default_rng(0)
    y, s = rng.random(50) < 0.4, np.round(rng.random(50), 1)  # ties included
    with_sklearn = lu.auroc(y, s)
    saved = sys.modules.get("sklearn.metrics")
    sys.modules["sklearn.metrics"] = None  # type: ignore[assignment]  # forces the ImportError branch
    try:
        assert lu.auroc(y, s) == pytest.approx(with_sklearn)
    finally:
        if saved is None:
            sys.modules.pop("sklearn.metrics", None)
        else:
            sys.modules["sklearn.metrics"] = saved


def test_choose_presence_threshold_by_hand():
    got = lu.choose_presence_threshold([0.9, 0.8, 0.7, 0.1, 0.2, 0.3], [1, 1, 1, 0, 0, 0])
    assert got["threshold"] == pytest.approx(0.5) and got["tpr"] == 1.0 and got["tnr"] == 1.0  # mid-way
    scores, labels = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.75], [1, 1, 1, 0, 0, 0, 0]
    # emptying every negative needs t in (0.75, 0.8]: keeps 2/3 of true masks (< 90%) -> balanced accuracy
    got = lu.choose_presence_threshold(scores, labels)
    assert got["threshold"] == pytest.approx(0.5) and "balanced" in got["criterion"]
    got = lu.choose_presence_threshold(scores, labels, min_sensitivity=0.5)
    assert got["threshold"] == pytest.approx(0.775) and got["tnr"] == 1.0 and got["tpr"] == pytest.approx(2 / 3)
    # a negative whose pixels are all below the pixel threshold is empty whatever the gate says
    got = lu.choose_presence_threshold(scores, labels, pixel_nonempty=[1, 1, 1, 1, 1, 1, 0])
    assert got["threshold"] == pytest.approx(0.5) and got["tnr"] == 1.0 and "TPR" in got["criterion"]
    with pytest.raises(ValueError, match="both"):
        lu.choose_presence_threshold([0.1, 0.2], [0, 0])


def test_report_and_calibration_on_a_tiny_model():
    model = vlseg.create_model("tiny-test", pretrained=False)
    ds = make_dataset(1)
    r = lu.language_use_report(model, ds, n_canvases=2, canvas_size=64)
    json.dumps(r, allow_nan=False)
    assert set(lu.CHECKS) <= set(r) and r["n_images"] == 4 and r["targets"] == lu.TARGETS
    assert r["presence"]["has_presence_head"] is True and r["composite"]["n_canvases"] == 2
    assert lu.summary_line(r).startswith("language use: ")
    cal = lu.presence_calibration(model, ds, max_images=2)
    assert 0.0 <= cal["threshold"] <= 1.0 and cal["n_positive"] > 0 and cal["n_negative"] > 0
    assert len(cal["curve"]["threshold"]) == len(cal["curve"]["tpr"]) == len(cal["curve"]["tnr"])
    assert isinstance(lu.calibrate_presence(model, ds, max_images=2), float)


def test_evaluate_saves_canvas_pictures(tmp_path):
    """vlseg evaluate's overlays include composite canvases (the leak is a picture, not only a number)."""
    from PIL import Image

    from vlseg.evaluation import evaluate

    model = vlseg.create_model("tiny-test", pretrained=False)
    evaluate(model, make_dataset(1), tmp_path, max_samples=4, ablations=False, overlays=2, progress=False)
    pics = sorted((tmp_path / "overlays").glob("canvas_*.png"))
    assert len(pics) == 2 and all(("_leak" in p.name) or p.name.endswith("_empty.png") for p in pics)
    assert Image.open(pics[0]).size == (512, 512)


def test_predict_fn_batches_prompts_and_allows_the_empty_prompt():
    model = vlseg.create_model("tiny-test", pretrained=False)
    fn = lu.as_predict_fn(model, {"presence_threshold": None})
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    p = fn(image, ["polyp", "", "skin lesion"])
    assert p.masks.shape == (3, 20, 30) and p.probs.shape == (3, 20, 30)
    direct = vlseg.predict(model, image, ["polyp", "skin lesion"], presence_threshold=None)
    assert np.array_equal(p.masks[[0, 2]], direct.masks) and np.allclose(p.presence[[0, 2]], direct.presence)
    assert np.allclose(p.probs[[0, 2]], direct.probs, atol=1e-5) and not np.allclose(p.probs[0], p.probs[2])
    calls = model.stats["image_encoder_calls"]
    p = fn(image, ["polyp", "", "skin lesion"])
    assert model.stats["image_encoder_calls"] == calls + 1  # one forward pass: the empty prompt rides along
    alone = vlseg.segment(model, image, [""], allow_empty_prompts=True, presence_threshold=None, return_probs=True)
    assert np.allclose(p.probs[1], alone[0], atol=1e-5) and p.probs[1].std() > 0  # an informative map, as alone
    assert np.isfinite(p.presence[1])
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        vlseg.predict(model, image, ["polyp", ""])
    with pytest.raises(TypeError, match="VLSegModel or a callable"):
        lu.as_predict_fn(object())


def test_wrong_class_at_every_level_is_checked():
    """A model that empties wrong-class names but segments everything for long prompts: the wrong-class check (class
    names) sees nothing wrong, the per-level figure does, and the summary line gives its range."""

    def fooled_by_long_prompts(image, prompts):
        p, every = oracle(image, prompts), ignores_prompt(image, prompts)
        long = np.array([len(t.split()) > 6 for t in prompts])
        masks = np.where(long[:, None, None], every.masks, p.masks)
        return vlseg.Prediction(masks=masks, probs=masks.astype(np.float32),
                                presence=np.where(long, 0.9, p.presence).astype(np.float32), has_presence_head=True)

    ds = make_dataset(2)
    r = lu.language_use_report(fooled_by_long_prompts, ds, n_canvases=2, canvas_size=96)
    assert r["wrong_class"]["empty_rate"] == 1.0 and r["wrong_class"]["pass"] is True
    per = r["levels"]["wrong_class_empty_per_level"]
    assert per["p1"] == 1.0 and per["p9"] == 0.0  # p9 adds a definition sentence: always long
    assert "wrong class emptied 0-100% over the levels" in lu.summary_line(r)
    assert all(v == 1.0 for v in lu.language_use_report(oracle, ds, n_canvases=2, canvas_size=96)["levels"][
        "wrong_class_empty_per_level"].values())


def test_per_dataset_present_leaves_out_images_annotated_without_their_class(monkeypatch):
    """evaluate_dataset's per_dataset averages in an image annotated without its class (a normal scan: Dice 0 for
    any mask); per_dataset_present scores only the images where the class is there."""
    from vlseg import evaluation
    from vlseg.data.schema import Sample

    def marks_a_square(model, image, prompts, **kw):  # a 12x12 square whatever is asked
        m = np.zeros((len(prompts), *image.shape[:2]), bool)
        m[:, 4:16, 4:16] = True
        return m

    monkeypatch.setattr(evaluation, "segment", marks_a_square)
    img = np.zeros((32, 32, 3), np.uint8)
    tumour = np.zeros((32, 32), bool)
    tumour[4:16, 10:22] = True  # overlaps half the square: Dice 2 * 72 / (144 + 144) = 0.5
    ds = [Sample(img, tumour, "breast tumor", dataset="busi"),
          Sample(img, np.zeros((32, 32), bool), "breast tumor", dataset="busi", negative=True),
          Sample(img, tumour, "polyp", dataset="cvc")]
    summary, rows = evaluation.evaluate_dataset(None, ds, levels=("p1",))
    assert sorted(r["dice"] for r in rows if r["dataset"] == "busi") == pytest.approx([0.0, 0.5])
    assert summary["per_dataset"]["busi"]["dice"] == pytest.approx(0.25) and summary["per_dataset"]["busi"]["n"] == 2
    assert summary["per_dataset_present"]["busi"]["dice"] == pytest.approx(0.5)
    assert summary["per_dataset_present"]["busi"]["n"] == 1
    assert summary["per_dataset_present"]["cvc"] == summary["per_dataset"]["cvc"]
    assert "all" not in summary["per_dataset_present"]


def _pres(image, label, kind, score, nonempty=True):
    return {"image": image, "label": label, "kind": kind, "score": score, "nonempty": nonempty}


def test_gate_fit_on_other_images_by_hand():
    """Images a, b: wrong-class scores 0.2 / 0.3, true 0.8 / 0.9. Images c, d: wrong 0.6 / 0.7, true 0.65 / 0.95.
    Fit on a, b: emptying both negatives puts t mid-way 0.3 -> 0.8, at 0.55, which on c, d keeps both wrong-class
    masks and both true ones. Fit on c, d: emptying both negatives (t 0.825) keeps one true mask in two, under 90%,
    so balanced accuracy picks t = 0.625 (mid-way 0.6 -> 0.65; tied with 0.825, the lower wins), which on a, b empties
    both wrong-class prompts and keeps both true masks. Pooled: 2 of 4 wrong-class prompts emptied, 4 of 4 true kept,
    where the gate fit on all four images and scored on them empties 3 of 4: the in-sample figure flatters."""
    rows = [_pres("a", False, "wrong_hard", 0.2), _pres("a", True, "present", 0.8),
            _pres("b", False, "wrong_random", 0.3), _pres("b", True, "present", 0.9),
            _pres("c", False, "wrong_hard", 0.6), _pres("c", True, "present", 0.65),
            _pres("d", False, "wrong_random", 0.7), _pres("d", True, "present", 0.95)]
    out = lu.crossfit_gate(rows, [["a", "b"]])
    assert out == {"empty_rate": 0.5, "true_kept_rate": 1.0, "splits": 1}
    whole = lu.choose_presence_threshold([r["score"] for r in rows], [r["label"] for r in rows])
    assert whole["tnr"] == 0.75  # in sample
    # an annotated-absent class is a negative to fit on (c, d's fit still picks 0.625), not a wrong-class prompt to
    # score: its mask, kept at a, b's 0.55, does not count (counted, the rate would read 2 of 5)
    rows2 = rows + [_pres("c", False, "absent", 0.99)]
    assert lu.choose_presence_threshold([0.6, 0.65, 0.7, 0.95, 0.99], [False, True, False, True, False])[
        "threshold"] == pytest.approx(0.625)
    assert lu.crossfit_gate(rows2, [["a", "b"]]) == {"empty_rate": 0.5, "true_kept_rate": 1.0, "splits": 1}
    # a mask with no pixel is empty whatever its score; a half with no negatives cannot be fitted: no split
    rows3 = [dict(r, nonempty=False) if r["image"] == "c" and not r["label"] else r for r in rows]
    assert lu.crossfit_gate(rows3, [["a", "b"]])["empty_rate"] == 0.75
    only_true = [r for r in rows if r["label"] or r["image"] in ("a", "b")]
    assert lu.crossfit_gate(only_true, [["a", "b"]]) == {"empty_rate": None, "true_kept_rate": None, "splits": 0}


def test_report_gives_the_gate_fit_on_other_images():
    """The report's out-of-sample figure is crossfit_gate over its own presence rows and seeded halvings of its
    images (the same for the same seed), and the summary line shows it; a model without a presence head has none."""
    ds = make_dataset(2)
    r = lu.language_use_report(_unsure, ds, canvas_size=96, keep_rows=True, n_canvases=2)
    pres = r["rows"]["presence"]
    halves = lu._random_halves((x["image"] for x in pres), 0, lu.CROSSFIT_SPLITS)
    assert len(halves) == 20 and len({tuple(h) for h in halves}) > 1
    n_img = len({x["image"] for x in pres})
    assert all(len(h) == n_img // 2 for h in halves) and halves == lu._random_halves(
        [x["image"] for x in pres][::-1], 0, 20)
    oos = r["wrong_class"]["out_of_sample"]
    assert oos == lu.crossfit_gate(pres, halves) and oos["splits"] > 0
    assert 0.0 <= oos["empty_rate"] <= 1.0 and 0.0 < oos["true_kept_rate"] <= 1.0
    line = lu.summary_line(r)
    assert (f"gate fit on other images: {100 * oos['empty_rate']:.1f}% / kept {100 * oos['true_kept_rate']:.1f}%)"
            in line)
    def no_head(image, prompts):
        return dataclasses.replace(ignores_prompt(image, prompts), has_presence_head=False)

    plain = lu.language_use_report(no_head, make_dataset(2, single_only=True), n_canvases=2, canvas_size=64)
    assert "out_of_sample" not in plain["wrong_class"] and "gate fit" not in lu.summary_line(plain)
