"""vlseg.training: typed config, pickle-free training state, metrics log, deterministic language-use batches,
mixed precision chosen by measurement."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vlseg
from vlseg import training as T


def test_config_types_and_unknown_keys():
    cfg = T.load_config(None, ["data=[{manifest: m.jsonl}]", "cache_features=off", "loss.dice_weight=2",
                               "composite_rate=0.5", "mixed_precision=auto"])
    assert cfg.cache_features == "off" and cfg.loss == {"dice_weight": 2.0} and cfg.composite_rate == 0.5
    for bad, msg in ((["lr=abc"], "lr"), (["batch_size=0"], "batch_size"), (["composite_rate=2"], "composite_rate"),
                     (["cache_features=sometimes"], "cache_features"), (["composite_tiles=[1, 9]"], "composite_tiles"),
                     (["lr_rate=1"], "unknown config key")):
        with pytest.raises(ValueError, match=msg):
            T.load_config(None, ["data=[{manifest: m.jsonl}]", *bad])
    with pytest.raises(ValueError, match="no training data"):
        T.load_config(None, [])


def test_yaml_file_with_wrong_types_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: [{manifest: m.jsonl}]\nmax_steps: many\n")
    with pytest.raises(ValueError, match="max_steps"):
        T.load_config(p, [])


def test_config_base_file_is_merged_under_the_file(tmp_path):
    """`base:` takes another file's keys (relative to the file, chained); the file's own keys win, mappings merge key
    by key, lists are replaced whole, overrides apply last; a loop or a missing base is an error naming it."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("data: [{manifest: a.jsonl}, {manifest: b.jsonl}]\nmax_steps: 100\n"
                                        "lr: 0.01\nloss: {dice_weight: 1.0, bce_weight: 2.0}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nmax_steps: 50\nloss: {bce_weight: 3.0}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\ndata: [{manifest: c.jsonl}]\nseed: 7\n")
    cfg = T.load_config(tmp_path / "sub" / "leaf.yaml", ["lr=0.5"])
    assert [s["manifest"] for s in cfg.data] == ["c.jsonl"]  # the list is replaced, not appended
    assert (cfg.max_steps, cfg.seed, cfg.lr) == (50, 7, 0.5)
    assert cfg.loss == {"dice_weight": 1.0, "bce_weight": 3.0}  # merged key by key
    (tmp_path / "sub" / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="loops"):
        T.load_config(tmp_path / "sub" / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ValueError, match="nowhere.yaml"):
        T.load_config(tmp_path / "c.yaml")


def test_image_only_reference_differs_from_the_main_job_only_in_its_language_keys():
    """The shipped image-only reference is the main job with the words made uninformative: every other key (model,
    steps, optimiser, augmentation, seed) is the main job's, through `base:`."""
    configs = Path(__file__).resolve().parents[1] / "finetune" / "configs"
    main = T.load_config(configs / "offline-shared.yaml").to_dict()
    ref = T.load_config(configs / "offline-shared-image-only.yaml").to_dict()
    differ = {k for k in main if main[k] != ref[k]}
    assert differ == {"data", "prompt_levels", "eval_levels", "prompts_per_image", "negative_rate",
                      "hard_negative_rate", "composite_rate", "calibrate_presence", "output_dir"}
    assert ref["prompt_levels"] == ["p1"] and ref["composite_rate"] == 0 and ref["negative_rate"] == 0
    assert [s for s in main["data"] if s in ref["data"]] == ref["data"]  # a subset, weighted as in the main job


def test_train_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 7, "best": 0.5, "rng": T.rng_state()}
    T.save_train_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json", "trainer_state.safetensors"]
    back = T.load_train_state(tmp_path)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt2.load_state_dict(back["optimizer"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and set(s1["state"]) == set(s2["state"]) == {0, 1}
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name])
    before = (torch.rand(3), np.random.rand(3))
    T.set_rng_state(back["rng"])
    T.set_rng_state(state["rng"])
    again = (torch.rand(3), np.random.rand(3))
    T.set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), again[0]) and before is not None
    with pytest.raises(ValueError, match="no training state"):
        T.load_train_state(tmp_path / "nope")


def test_metrics_log_truncates_replayed_steps(tmp_path):
    log = T.MetricsLog(tmp_path / "m.jsonl")
    for s in (1, 2, 3, 4, 5):
        log.write({"step": s, "loss": 1.0 / s})
    log.truncate(3)
    for s in (4, 5):
        log.write({"step": s, "loss": 0.0})
    steps = [r["step"] for r in log.records()]
    assert steps == [1, 2, 3, 4, 5]


def _shared_train(shared_data):
    ds = vlseg.data.from_manifest(shared_data / "manifest_all.jsonl")
    return vlseg.data.split_sources([{"manifest": str(shared_data / "manifest_all.jsonl")}], 0.2, 0)[0], ds


def test_batches_are_deterministic_and_use_language(shared_data):
    """The same (seed, step) gives the same batch from a fresh batcher; canvas and negative targets are right."""
    train, _ = _shared_train(shared_data)
    cfg_args = [f"data=[{{manifest: {shared_data / 'manifest_all.jsonl'}}}]", "batch_size=6", "prompts_per_image=4",
                "composite_rate=0.5", "negative_rate=0.3", "augment=null"]
    cfg = T.load_config(None, cfg_args)
    proc = vlseg.create_model("tiny-test", pretrained=False).processor
    task = T.get_task("segmentation")
    a = task.batcher(type("M", (), {"processor": proc})(), train, cfg, 0, 1)
    b = task.batcher(type("M", (), {"processor": proc})(), train,  # decoding every image again: the same batches
                     T.load_config(None, [*cfg_args, "decode_cache_mb=0"]), 0, 1)
    seen_canvas = seen_negative = False
    for step in [0, 1, 2, 3, 1, 0]:  # steps seen again: their images come from a's cache
        x, y = a(step, "cpu"), b(step, "cpu")
        assert x.inputs["prompts"] == y.inputs["prompts"] and x.keys == y.keys
        assert torch.equal(x.pixel_values, y.pixel_values) and torch.equal(x.inputs["targets"], y.inputs["targets"])
        assert x.inputs["targets"].shape == (6, 4, 64, 64)
        seen_canvas |= any(k is None for k in x.keys)
        seen_negative |= bool((x.inputs["targets"].flatten(2).amax(-1) == 0).any())
    assert seen_canvas and seen_negative
    assert a(1, "cpu").inputs["prompts"] != a(2, "cpu").inputs["prompts"]
    assert a.load.hits > 0 and len(a.load) > 0 and len(b.load) == 0 and b.load.misses > 0


def test_group_cache_keeps_recent_images_within_its_bytes_and_hands_out_copies():
    from types import SimpleNamespace

    from vlseg.data import GroupCache, group_by_image

    rng = np.random.default_rng(0)
    rows = [SimpleNamespace(image=rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), mask=rng.random((8, 8)) > 0.5,
                            class_name=c) for c in ("a", "b", "c")]

    class Rows:  # three images, one class each
        records = [{"image": f"{i}.png", "dataset": "d"} for i in range(3)]

        def __getitem__(self, i):
            return rows[i]

    ds = Rows()
    groups = group_by_image(ds)
    one = 8 * 8 * 3 + 8 * 8  # bytes of an image and its mask
    cache = GroupCache(max_bytes=2 * one)
    image, masks = cache(ds, groups[0])
    assert np.array_equal(image, rows[0].image) and np.array_equal(masks["a"], rows[0].mask)
    image[:] = 0
    masks["a"][:] = False  # the caller's copy, not the cache's
    image2, masks2 = cache(ds, groups[0])
    assert cache.hits == 1 and np.array_equal(image2, rows[0].image) and np.array_equal(masks2["a"], rows[0].mask)
    cache(ds, groups[1])
    cache(ds, groups[0])  # group 0 is now the most recent: group 1 goes when group 2 arrives
    cache(ds, groups[2])
    assert len(cache) == 2 and cache.bytes == 2 * one
    misses = cache.misses
    cache(ds, groups[0])
    assert cache.misses == misses
    cache(ds, groups[1])
    assert cache.misses == misses + 1
    off = GroupCache(0)
    off(ds, groups[0])
    assert len(off) == 0 and off.bytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        GroupCache(-1)


def test_own_absent_class_is_a_hard_negative():
    """A normal image (its class annotated absent, as BUSI's tumour-free scans) is asked for that class at the
    hard-negative rate (0.5 of its prompts here), not as one of many random classes (~1/7 here): the presence head
    must learn absence where it is hardest to tell."""
    from synthetic_data import ArrayDataset, rows_for, square

    rows = []
    for i in range(3):
        rows += rows_for("busi", f"b{i}", 32, 32, {"breast tumor": square(32, 32, 8, 8, 10)})
    rows += rows_for("busi", "normal", 32, 32, {"breast tumor": np.zeros((32, 32), bool)})
    for j, c in enumerate(("polyp", "skin lesion", "mitochondria", "cell membranes", "grasper", "hook", "liver")):
        rows += rows_for(f"d{j}", f"x{j}", 32, 32, {c: square(32, 32, 4, 4, 8)})
    cfg = T.load_config(None, ["data=[{manifest: unused.jsonl}]", "batch_size=8", "prompts_per_image=3", "negative_rate=0.3",
                               "hard_negative_rate=0.5", "composite_rate=0", "augment=null", "prompt_levels=[p1]"])
    proc = vlseg.create_model("tiny-test", pretrained=False).processor
    ds = vlseg.data.PooledDataset({"all": ArrayDataset(rows)})
    batcher = T.get_task("segmentation").batcher(type("M", (), {"processor": proc})(), ds, cfg, 0, 1)
    asked = []
    for step in range(60):
        b = batcher(step, "cpu")
        for key, prompts in zip(b.keys, b.inputs["prompts"]):
            if "normal" in key:
                asked += ["breast" in p for p in prompts]  # breast tumo(u)r, mass, lesion: its synonyms
    assert len(asked) > 60 and 0.35 < np.mean(asked) < 0.7


def test_absent_image_weight_draws_normal_scans_more_often_and_keeps_dataset_shares():
    """Rows of an image annotated without its class (a normal scan: every row ``negative``) get ``factor`` times the
    weight of their dataset's other rows, the dataset's total unchanged; the batcher then draws it that much more."""
    from synthetic_data import ArrayDataset, rows_for, square

    from vlseg.data import group_by_image, reweight_absent_images

    busi = []
    for i in range(3):
        busi += rows_for("busi", f"b{i}", 32, 32, {"breast tumor": square(32, 32, 8, 8, 10)})
    empty = np.zeros((32, 32), bool)
    busi += [{**r, "negative": True} for r in rows_for("busi", "normal", 32, 32, {"breast tumor": empty})]
    other = rows_for("ph2", "s0", 32, 32, {"skin lesion": square(32, 32, 4, 4, 8)}) + \
        rows_for("ph2", "s1", 32, 32, {"skin lesion": square(32, 32, 6, 6, 8)})
    ds = vlseg.data.PooledDataset({"busi": ArrayDataset(busi), "ph2": ArrayDataset(other)},
                                  weights={"busi": 2, "ph2": 1})
    groups = group_by_image(ds)
    base = np.asarray(ds.item_weights())
    w = reweight_absent_images(base, ds, groups, 3.0)
    normal = [i for g in groups if g.key.endswith("#normal") for i in g.indices]
    assert normal == [3] and base[3] == pytest.approx(2 / 3 / 4)
    assert w[3] == pytest.approx(2 / 3 * 3 / 6)  # 3 : 1 : 1 : 1 within BUSI
    assert w[0] == w[1] == w[2] == pytest.approx(2 / 3 / 6)
    assert w[:4].sum() == pytest.approx(2 / 3) and np.array_equal(w[4:], base[4:])  # shares unchanged
    assert np.array_equal(reweight_absent_images(base, ds, groups, 1.0), base)
    with pytest.raises(ValueError, match="> 0"):
        reweight_absent_images(base, ds, groups, 0.0)
    with pytest.raises(ValueError, match="3 weights for 6 rows"):
        reweight_absent_images(base[:3], ds, groups, 2.0)
    with pytest.raises(ValueError, match="absent_image_weight"):
        T.load_config(None, ["data=[{manifest: unused.jsonl}]", "absent_image_weight=-1"])

    proc = vlseg.create_model("tiny-test", pretrained=False).processor
    drawn = {}
    for factor in (1.0, 4.0):
        cfg = T.load_config(None, ["data=[{manifest: unused.jsonl}]", "batch_size=8", "composite_rate=0",
                                   "augment=null", f"absent_image_weight={factor}", "prompt_levels=[p1]"])
        batcher = T.get_task("segmentation").batcher(type("M", (), {"processor": proc})(), ds, cfg, 0, 1)
        keys = [k for step in range(40) for k in batcher(step, "cpu").keys]
        drawn[factor] = (sum("#normal" in k for k in keys), sum(k.startswith("ph2#") for k in keys))
    (n1, p1), (n4, p4) = drawn[1.0], drawn[4.0]
    # 320 draws, BUSI 2/3 of them: the normal scan 1/4 of BUSI's draws, then 4/7 (expected 53 -> 122); PH2 ~107 both
    assert abs(n1 - 320 * 2 / 3 / 4) < 18 and abs(n4 - 320 * 2 / 3 * 4 / 7) < 25 and abs(p4 - p1) < 25


def test_mixed_precision_auto_is_measured(monkeypatch):
    from vlseg.training import precision as P

    class Info:
        cpu_bf16 = False
        cuda_bf16 = False

        def describe(self, device):
            return "test cpu"

    monkeypatch.setattr(P, "machine_info", lambda device=None: Info())
    choice, rep = P.choose_mixed_precision(None, None, None, "cpu")
    assert choice == "no" and "not native" in rep["reason"]
    Info.cpu_bf16 = True
    monkeypatch.setattr(P, "_step_seconds", lambda m, t, b, bf16, d: 1.0 if bf16 else 2.0)
    model = vlseg.create_model("tiny-test", pretrained=False)
    choice, rep = P.choose_mixed_precision(model, None, None, "cpu")
    assert choice == "bf16" and rep["speedup"] == 2.0
    monkeypatch.setattr(P, "_step_seconds", lambda m, t, b, bf16, d: 1.05 if bf16 else 1.0)
    assert P.choose_mixed_precision(model, None, None, "cpu")[0] == "no"
    # the machine gets busy while the bf16 steps would all have run back to back: taking turns and keeping the
    # fastest of each still sees bf16 at 2x (timed one side after the other, this read 1.0x: fp32 chosen)
    clock = iter([2.0, 1.0] + [2.0, 1.0] + [4.0, 2.0] * 2)  # (fp32, bf16) warm-up, then rounds; later ones slowed
    monkeypatch.setattr(P, "_step_seconds", lambda m, t, b, bf16, d: next(clock))
    choice, rep = P.choose_mixed_precision(model, None, None, "cpu")
    assert choice == "bf16" and rep["speedup"] == 2.0 and rep["fp32_step_s"] == 2.0


def test_memory_format_auto_is_measured(monkeypatch):
    from vlseg.training import precision as P

    model = vlseg.create_model("tiny-test", pretrained=False)

    def first_conv(m):  # a 3x3 one: a 1x1 kernel's weight is contiguous in both layouts
        return next(c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size != (1, 1))

    def channels_last(m):
        w = first_conv(m).weight
        return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()

    conv = first_conv(model)
    before = conv.weight.stride()
    layouts = []

    def seconds(probe, task, batch, bf16, device):  # channels-last probes "run" faster
        last = channels_last(probe)
        layouts.append(last)
        return 1.0 if last else 1.2

    monkeypatch.setattr(P, "_step_seconds", seconds)
    choice, rep = P.choose_memory_format(model, None, None, "cpu", bf16=False)
    assert choice == "channels_last" and rep["speedup"] == 1.2 and "1.20x" in rep["reason"]
    assert layouts.count(True) == layouts.count(False) == 6  # one warm-up and five rounds each
    assert layouts[:4] == [True, False, False, True]  # in alternating order
    # one slow step on either side does not decide: the median of the paired rounds' ratios does
    # (warm-up, then five rounds) per layout; the fastest of each would read 1.0x
    clock = {False: iter([1.0, 1.1, 1.1, 1.1, 1.0, 1.1]), True: iter([1.0, 1.0, 1.0, 1.0, 3.0, 1.0])}
    monkeypatch.setattr(P, "_step_seconds", lambda m, t, b, bf16, d: next(clock[channels_last(m)]))
    choice, rep = P.choose_memory_format(model, None, [None, None], "cpu", bf16=False)
    assert choice == "channels_last" and rep["speedup"] == 1.1 and rep["contiguous_step_s"][3] == 1.0
    assert conv.weight.stride() == before  # the caller's model keeps its layout
    monkeypatch.setattr(P, "_step_seconds", lambda m, t, b, bf16, d: 1.0 if channels_last(m) else 1.028)
    assert P.choose_memory_format(model, None, None, "cpu", bf16=False)[0] == "channels_last"  # seed 2's reading
    monkeypatch.setattr(P, "_step_seconds", lambda m, t, b, bf16, d: 1.0)  # a tie keeps the default layout
    assert P.choose_memory_format(model, None, None, "cpu", bf16=False)[0] == "contiguous"
    linear_only = torch.nn.Sequential(torch.nn.Linear(3, 3))
    choice, rep = P.choose_memory_format(linear_only, None, None, "cpu", bf16=False)
    assert choice == "contiguous" and "no 2-D convolutions" in rep["reason"]


def test_model_deepcopy_has_its_own_lock_and_no_cache():
    import copy

    m = vlseg.create_model("tiny-test", pretrained=False)
    with torch.inference_mode():
        m(torch.randn(1, 3, 64, 64), ["polyp"])
    c = copy.deepcopy(m)
    assert c._cache_lock is not m._cache_lock and len(c._text_cache) == 0 and len(m._text_cache) == 1
    for (k, v), (k2, v2) in zip(m.state_dict().items(), c.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    json.dumps(c.config.to_dict())


def test_interrupted_swap_without_atomic_exchange_is_recovered(tmp_path, monkeypatch):
    """Where the system cannot swap folders atomically, a crash between the two renames leaves only .last.old:
    the next save or resume restores it (with a warning), so last/ is never lost."""
    import os

    from vlseg.training import state as S

    tiny = vlseg.create_model("tiny-test", pretrained=False)
    S.save_checkpoint_atomic(tiny, tmp_path, "last", {"step": 1})
    monkeypatch.setattr(S, "_exchange", lambda a, b: False)
    real = os.replace

    def dying(src, dst):
        if str(dst) == str(tmp_path / "last"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(S.os, "replace", dying)
    with pytest.raises(KeyboardInterrupt):
        S.save_checkpoint_atomic(tiny, tmp_path, "last", {"step": 2})
    monkeypatch.setattr(S.os, "replace", real)
    assert not (tmp_path / "last").exists() and (tmp_path / ".last.old").is_dir()
    with pytest.warns(UserWarning, match="restored"):
        folder = T.recover_checkpoint(tmp_path / "last")
    assert T.load_train_state(folder)["step"] == 1 and vlseg.load(folder) is not None


def test_checkpoint_dtype_mismatch_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny = vlseg.create_model("tiny-test", pretrained=False)
    folder = tiny.save_pretrained(tmp_path / "ck")
    state = load_file(f"{folder}/model.safetensors")
    k = next(k for k, v in state.items() if v.is_floating_point())
    state[k] = state[k].to(torch.int32)
    save_file(state, f"{folder}/model.safetensors")
    with pytest.raises(vlseg.CheckpointError, match="dtype mismatch"):
        vlseg.load(folder)
